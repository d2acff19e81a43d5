"""Reconstruct every slice of one h5 file with a classical method or a trained model.

Two ways in, one path through (:func:`reconstruct_file`):

- **retrospective** (fully sampled file): each slice is undersampled with the seeded mask of the
  run config's ``data.*`` keys (the mask a training run uses, so numbers are comparable) or with
  a given mask, and metrics are computed against the fully sampled RSS;
- **prospective** (k-space undersampled at acquisition, exact zeros on the skipped lines, the
  clinical case): the mask is read from the data (or given), coil maps come from the acquired
  ACS lines, and there are no metrics (no reference).

Whether a file is undersampled is detected (:func:`recon.data.checks.sampling`) unless the caller
says. Every method (zero-filled, SENSE, CS, a trained model) sees the same normalised k-space,
mask and coil maps. Classical baselines use SigPy: CG-SENSE (``SenseRecon``) and L1-wavelet
compressed sensing (:func:`cs_l1_wavelet`, GLEAM Sec. V-A.2: 100 iterations). Outputs (h5, NIfTI,
PNG previews, a JSON report) and the coil-map cache go to an output folder, never next to the
input (which may be a read-only archive).
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from recon.config import DataConfig
from recon.data.checks import accel_reason, sampling
from recon.data.dataset import file_samples
from recon.data.h5io import DataError, read_volume
from recon.data.sample import Sample, collate
from recon.fileio import atomic_path, atomic_write_json
from recon.metrics import nrmse, psnr, ssim, support_mask, support_metrics, volume_ssim
from recon.train.trainer import zero_filled

METHODS = ("sense", "cs", "zero-filled", "model")
# L1 weight of CS relative to the largest wavelet coefficient of the start image S^H F^H y, so
# that it does not depend on the data's scale, with the elastic-net weight CS_L2. Measured on
# the four synthetic sites and four wide-object phantoms (48-64 px, 2-8 coils, R=4, 100
# iterations), {1e-3, 3e-3} x CS_L2 {0, 1e-2, 3e-2}: 1e-3 with 1e-2 is best or within 0.03
# NRMSE of the best on each, and never worse than the start image on the phantoms.
CS_LAMBDA = 1e-3
CS_ITERS = 100
# Elastic-net weight on the wavelet coefficients: SENSE's Tikhonov weight (1e-2, relative to
# ||A^H A|| <= 1 with ESPIRiT maps). Without it the L1 solution overfits where the coil maps
# explain the data poorly (an object at the FOV's edge, R near the coil count) and ends worse
# than its start after 100 iterations.
CS_L2 = 1e-2


def _max_eig(op: Any, dtype: Any, iters: int = 60, seed: int = 0) -> float:
    """Largest eigenvalue of the Hermitian ``op`` by SigPy's power iteration (``MaxEig``), from
    a seeded start vector (MaxEig's own is unseeded; its power method iterates it in place)."""
    import sigpy as sp

    app = sp.app.MaxEig(op, dtype=dtype, max_iter=iters, show_pbar=False)
    rng = np.random.default_rng(seed)
    start = rng.standard_normal(app.x.shape) + 1j * rng.standard_normal(app.x.shape)
    app.x[...] = start.astype(app.x.dtype) if np.iscomplexobj(app.x) else start.real
    return float(app.run())


def cs_l1_wavelet(
    y: np.ndarray,
    maps: np.ndarray,
    mask: np.ndarray,
    lamda: float = CS_LAMBDA,
    max_iter: int = CS_ITERS,
    l2: float = CS_L2,
) -> tuple[np.ndarray, dict[str, Any]]:
    """L1-wavelet compressed sensing that converges:
    ``min_c 1/2 ||A W^H c - y||^2 + lam ||c||_1 + l2/2 ||c||^2``.

    ``A = P F S`` (``sigpy.mri.linop.Sense``), ``W`` the Daubechies-4 wavelet transform
    (``sigpy.linop.Wavelet``), image ``x = W^H c``. Why not ``sigpy.mri.app.L1WaveletRecon``:
    SigPy's wavelet is a redundant isometry (``W^H W = I`` but ``W W^H != I``, zero-padded
    boundaries), so its analysis prox ``W^H soft(W x)`` is inexact, and with FISTA's momentum
    the image grew with the iterations on wrap-around data (8x the amplitude on a real brain).
    The synthesis form has the exact prox (soft-thresholding of ``c``). Solved by monotone FISTA
    (Beck and Teboulle 2009, MFISTA): the objective never increases. Step ``1 / L``, ``L`` the
    largest eigenvalue of ``(A W^H)^H (A W^H)`` by SigPy's power iteration (``MaxEig``), plus 1%
    for the power method's underestimate. ``lam = lamda * max |W A^H y|`` (scale-free); ``l2``
    (:data:`CS_L2`) keeps the solution from overfitting where the maps explain the data
    poorly. The start is the zero-filled SENSE-combined image ``A^H y``.

    Parameters
    ----------
    y : complex ``[C, H, W]`` undersampled k-space (zeros where not sampled)
    maps : complex ``[C, H, W]``
    mask : ``[H, W]`` 0/1

    Returns
    -------
    x : complex64 ``[H, W]``
    info : dict
        ``lambda`` (absolute), ``step`` (1/L), ``iterations``, ``objective_start`` and
        ``objective_end``.
    """
    import sigpy as sp
    import sigpy.mri.linop as mri_linop

    A = mri_linop.Sense(maps, weights=mask)  # weights = P (0/1)
    W = sp.linop.Wavelet(A.ishape, wave_name="db4")
    B = A * W.H
    yw = y * mask  # P y
    x0 = A.H(yw)  # start: S^H F^H P y
    c = W(x0)
    lam = float(lamda) * float(np.abs(c).max())
    step = 1.0 / (1.01 * _max_eig(B.N, c.dtype) + l2)
    bhy = B.H(yw)

    def objective(v: np.ndarray) -> float:
        r = B(v) - yw
        return float(
            0.5 * np.vdot(r, r).real + lam * np.abs(v).sum() + 0.5 * l2 * np.vdot(v, v).real
        )

    x, z, t = c, c.copy(), 1.0
    f_x = f_start = objective(c)
    for _ in range(max_iter):
        u = z - step * (B.N(z) - bhy)
        mag = np.abs(u)  # prox of lam |c| + l2/2 |c|^2: complex soft-thresholding, shrunk
        u = u * (np.maximum(mag - lam * step, 0) / np.maximum(mag, 1e-30) / (1 + l2 * step))
        f_u = objective(u)
        x_new = u if f_u <= f_x else x  # monotone: keep the better of the two
        f_x = min(f_u, f_x)
        t_new = (1 + np.sqrt(1 + 4 * t * t)) / 2
        z = x_new + (t / t_new) * (u - x_new) + ((t - 1) / t_new) * (x_new - x)
        x, t = x_new, t_new
    info = {
        "lambda": lam,
        "lambda_rel": float(lamda),
        "step": step,
        "iterations": int(max_iter),
        "objective_start": f_start,
        "objective_end": f_x,
    }
    return np.asarray(W.H(x), dtype=np.complex64), info


def _sigpy_recon(sample: Sample, method: str, cs_lambda: float, cs_iters: int) -> torch.Tensor:
    import sigpy.mri.app as app

    y, maps = sample.kspace.numpy(), sample.maps.numpy()  # [C, H, W]
    weights = sample.mask.numpy()
    if method == "sense":
        alg = app.SenseRecon(y, maps, lamda=1e-2, weights=weights, max_iter=30, show_pbar=False)
        return torch.from_numpy(np.asarray(alg.run()).astype(np.complex64))
    x, _ = cs_l1_wavelet(y, maps, weights, cs_lambda, cs_iters)
    return torch.from_numpy(x)


def load_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """A sampling mask from ``.npy`` or ``.h5`` (dataset ``mask``, or the file's only dataset):
    ``[W]`` phase-encode lines, ``[H, W]`` or ``[slices, H, W]``; nonzero = sampled."""
    p = Path(path)
    if not p.is_file():
        raise DataError(p, "mask", "mask file does not exist")
    if p.suffix == ".npy":
        arr = np.load(p)
    elif p.suffix in (".h5", ".hdf5"):
        with h5py.File(p, "r") as f:
            names = [k for k in f if isinstance(f[k], h5py.Dataset)]
            key = "mask" if "mask" in names else (names[0] if len(names) == 1 else None)
            if key is None:
                raise DataError(p, "mask", f"no dataset 'mask' (datasets: {names or 'none'})")
            arr = f[key][()]
    else:
        raise DataError(p, "mask", "expected a .npy or .h5 mask file")
    arr = np.asarray(arr)
    if arr.ndim not in (1, 2, 3) or not np.isfinite(arr.astype(np.float64)).all():
        raise DataError(p, "mask", f"expected [W], [H, W] or [slices, H, W], got {arr.shape}")
    return (arr != 0).astype(np.float32)


def is_undersampled(path: str | os.PathLike[str]) -> bool:
    """Whether the file's k-space was undersampled at acquisition (zero lines between acquired
    ones, :func:`recon.data.checks.sampling`)."""
    vol = read_volume(path, expect_full=False, warn=False)
    info = sampling(vol.kspace)
    return bool(info is not None and info.undersampled)


def default_out_dir() -> Path:
    """``runs/recon-<time>/`` under the current directory (never next to the input)."""
    return Path("runs") / f"recon-{time.strftime('%Y%m%d-%H%M%S')}"


def _metrics(img: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    sup = support_mask(target)
    inside = support_metrics(img, target, sup)
    return {
        "ssim": float(ssim(img, target)),
        "nrmse": float(nrmse(img, target)),
        "psnr": float(psnr(img, target)),
        "support_ssim": float(inside["ssim"]),
        "support_nrmse": float(inside["nrmse"]),
        "support_psnr": float(inside["psnr"]),
        "support_fraction": float(sup.float().mean()),
    }


def _write_outputs(
    h5_path: Path,
    images: np.ndarray,
    method: str,
    attrs: dict[str, Any],
    png_dir: Path | None,
    nifti: bool,
    stem: str,
) -> dict[str, str]:
    """h5 (``reconstruction_<method>`` [slices, H, W]), NIfTI and PNG previews."""
    outputs = {"h5": str(h5_path)}
    with atomic_path(h5_path) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset(f"reconstruction_{method}", data=images.astype(np.float32))
        for k, v in attrs.items():
            f.attrs[k] = "" if v is None else v
    if nifti:
        import nibabel as nib

        nii = h5_path.with_suffix(".nii.gz")
        # [H, W, slices]; no geometry in a fastMRI file: identity affine (1 mm voxels)
        img = nib.Nifti1Image(np.moveaxis(images, 0, -1).astype(np.float32), np.eye(4))
        img.header["descrip"] = f"fedunroll {method}{' rotated' if attrs['rotated'] else ''}"
        with atomic_path(nii) as tmp:
            nib.save(img, str(tmp) + ".nii.gz")
            os.replace(str(tmp) + ".nii.gz", tmp)
        outputs["nifti"] = str(nii)
    if png_dir is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        png_dir.mkdir(parents=True, exist_ok=True)
        for s, picture in enumerate(images):
            plt.imsave(png_dir / f"{stem}_s{s:03d}_{method}.png", picture, cmap="gray")
        outputs["png_dir"] = str(png_dir)
    return outputs


def reconstruct_file(
    path: str | os.PathLike[str],
    method: str = "sense",
    out: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    data: DataConfig | None = None,
    device: str = "cpu",
    png_dir: str | os.PathLike[str] | None = None,
    cs_lambda: float = CS_LAMBDA,
    num_unrolls: int | None = None,
    *,
    prospective: bool | None = None,
    mask: np.ndarray | str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    cs_iters: int = CS_ITERS,
    nifti: bool = True,
    png: bool = True,
) -> dict[str, Any]:
    """Reconstruct ``path`` and write the images, previews and a JSON report.

    Parameters
    ----------
    method : {'sense', 'cs', 'zero-filled', 'model'}
        ``model`` needs ``checkpoint``.
    out : path-like, optional
        Output folder (default :func:`default_out_dir`); a path ending in ``.h5`` names the
        image file itself (its folder is the output folder).
    data : DataConfig, optional
        The run config's data section (mask keys, crop, coil-map estimator).
    png_dir : path-like, optional
        PNG folder (default ``<out>/png``; ``png=False`` for none).
    prospective : bool, optional
        The file is undersampled at acquisition (None: detect).
    mask : array or path, optional
        Sampling mask (:func:`load_mask`): retrospective on a fully sampled file, or the mask of
        a prospective one (instead of its zero lines). Working orientation (phase encode along
        ``W`` after any rotation).
    cache_dir : path-like, optional
        Coil-map cache (default ``<out>/cache``).

    Returns
    -------
    dict
        The report also written as ``<stem>.<method>.json``: ``mode``, ``sampling``,
        ``calibration``, ``rotated``, ``warnings``, ``outputs``, per-slice and mean metrics
        (whole image, inside the support, fastMRI per-volume SSIM) or none without reference.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    data = data or DataConfig()
    src = Path(path)
    model = None
    if method == "model":
        if checkpoint is None:
            raise ValueError(
                "--method model needs --checkpoint (sense, cs and zero-filled need none)"
            )
        from recon.models.checkpoint import load_checkpoint

        model, _, _ = load_checkpoint(checkpoint, device)
        model.eval()
    target = Path(out) if out is not None else default_out_dir()
    out_dir, h5_path = (
        (target.parent, target)
        if target.suffix == ".h5"
        else (target, target / f"{src.stem}.{method}.h5")
    )
    masks = load_mask(mask) if isinstance(mask, str | os.PathLike) else mask
    if prospective is None:
        prospective = is_undersampled(src)
    cache = Path(cache_dir) if cache_dir is not None else out_dir / "cache"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = file_samples(
            src,
            **data.dataset_kwargs(
                masks=masks, prospective=prospective, cache_dir=cache, max_slices=None
            ),
        )
    notes = [str(w.message) for w in caught]
    for note in notes:
        warnings.warn(note, stacklevel=2)
    sampled = samples.sampling()
    if mask is not None and not isinstance(mask, np.ndarray):
        sampled = type(sampled)(**{**sampled.as_dict(), "mask": f"file {Path(mask).name}"})
    coils = int(samples[0].kspace.shape[0])
    why = accel_reason(sampled.effective_accel, coils, measured=prospective)
    if why is not None:
        why = f"{src.name}: {why}"
        warnings.warn(why, stacklevel=2)
        notes.append(why)
    rotated = bool(samples[0].meta.get("rotated", False))
    images, rows = [], []
    disable = len(samples) < 4
    for s in tqdm(samples, desc=f"{method} {src.name}", leave=False, disable=disable):
        batch = collate([s])
        physics = batch.physics()
        with torch.no_grad():
            if method == "zero-filled":
                img = zero_filled(batch)
            elif method == "model":
                assert model is not None
                x = model(batch.kspace.to(device), physics.to(device), num_unrolls=num_unrolls)
                img = physics.rss(x.cpu())
            else:
                img = physics.rss(_sigpy_recon(s, method, cs_lambda, cs_iters)[None])
        row: dict[str, Any] = {"slice": s.meta["slice"], "scale": s.meta["scale"]}
        if not prospective:
            row.update(_metrics(img[0], batch.target[0]))
        rows.append(row)
        images.append(img[0].numpy())
    volume = np.stack(images)  # [S, H, W], normalised units (ACS-RSS max = 1)
    attrs = {
        "source": str(src),
        "method": method,
        "mode": "prospective" if prospective else "retrospective",
        **sampled.as_dict(),
        "calib_lines": samples.calibration["lines"],
        "calib_from": samples.calibration["source"],
        "rotated": rotated,
        "crop": data.crop,
    }
    png_out = (Path(png_dir) if png_dir is not None else out_dir / "png") if png else None
    outputs = _write_outputs(h5_path, volume, method, attrs, png_out, nifti, src.stem)
    report: dict[str, Any] = {
        "file": str(src),
        "method": method,
        "mode": attrs["mode"],
        "sampling": sampled.as_dict(),
        "calibration": dict(samples.calibration),
        "coils": coils,
        "rotated": rotated,
        "reference": not prospective,
        "warnings": notes,
        "out": outputs["h5"],
        "outputs": outputs,
        "slices": rows,
    }
    if method == "cs":
        report["cs"] = {"lambda_rel": cs_lambda, "iterations": cs_iters}
    if prospective:
        report["mean"] = None
        report["metrics"] = "none: no fully sampled reference (prospective data)"
    else:
        keys = [k for k in rows[0] if k not in ("slice", "scale")]
        report["mean"] = {k: float(np.mean([r[k] for r in rows])) for k in keys}
        ref = torch.stack([samples[i].target for i in range(len(samples))])
        report["volume"] = {"ssim": volume_ssim(torch.from_numpy(volume), ref)}
    report["report"] = str(h5_path.with_suffix(".json"))
    atomic_write_json(h5_path.with_suffix(".json"), report)
    return report


def describe_report(report: dict[str, Any]) -> str:
    """The lines ``fedunroll recon`` prints for a report."""
    s = report["sampling"]
    acc = "" if s.get("accel") is None else f" R={s['accel']:g}"
    seed = "" if s.get("seed") is None else f", seed {s['seed']}"
    cal = report["calibration"]
    lines = [
        f"{report['method']} ({report['mode']}): {len(report['slices'])} slices of "
        f"{report['file']} -> {report['out']}",
        f"sampling: {s['mask']}{acc}, effective R {s['effective_accel']:.2f} "
        f"({s['sampled_lines']:g} of {s['total_lines']} lines, ACS included), "
        f"{s['acs_lines']} ACS lines{seed}; coil maps from {cal['lines']} calibration lines "
        f"({cal['source']}), {report['coils']} coils",
    ]
    if report["rotated"]:
        lines.append(
            "rotated: the file's readout is horizontal; images are transposed (H <-> W) "
            "relative to the file (attribute 'rotated')"
        )
    m = report["mean"]
    if m is None:
        lines.append(f"metrics: {report['metrics']}")
    else:
        lines.append(
            f"whole image: SSIM {m['ssim']:.4f}  NRMSE {m['nrmse']:.4f}  PSNR {m['psnr']:.2f} dB;"
            f" inside the object: SSIM {m['support_ssim']:.4f}  NRMSE "
            f"{m['support_nrmse']:.4f}  PSNR {m['support_psnr']:.2f} dB; per-volume SSIM "
            f"{report['volume']['ssim']:.4f} (vs fully sampled RSS; per slice in "
            f"{report['report']})"
        )
    lines += [f"warning: {w}" for w in report["warnings"]]
    return "\n".join(lines)


__all__ = [
    "CS_LAMBDA",
    "METHODS",
    "cs_l1_wavelet",
    "describe_report",
    "is_undersampled",
    "load_mask",
    "reconstruct_file",
]
