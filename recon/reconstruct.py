"""Reconstruct every slice of one h5 file with a classical method or a trained model.

The file is treated as fully sampled: each slice is undersampled retrospectively with the same
seeded mask the training pipeline would use (so numbers are comparable with training), the
chosen method reconstructs it, and metrics are computed against the fully sampled RSS.
Classical baselines use SigPy: CG-SENSE (``SenseRecon``) and L1-wavelet compressed sensing
(``L1WaveletRecon``, GLEAM Sec. V-A.2: 100 iterations).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from recon.config import DataConfig
from recon.data.dataset import file_samples
from recon.data.sample import Sample, collate
from recon.fileio import atomic_path
from recon.metrics import nrmse, psnr, ssim
from recon.train.trainer import zero_filled

METHODS = ("zero-filled", "sense", "cs", "model")


def _sigpy_recon(sample: Sample, method: str, cs_lambda: float) -> torch.Tensor:
    import sigpy.mri.app as app

    y, maps = sample.kspace.numpy(), sample.maps.numpy()  # [C, H, W]
    weights = sample.mask.numpy()
    if method == "sense":
        alg = app.SenseRecon(y, maps, lamda=1e-2, weights=weights, max_iter=30, show_pbar=False)
    else:
        alg = app.L1WaveletRecon(
            y, maps, lamda=cs_lambda, weights=weights, max_iter=100, show_pbar=False
        )
    return torch.from_numpy(np.asarray(alg.run()).astype(np.complex64))


def reconstruct_file(
    path: str | os.PathLike[str],
    method: str,
    out: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    data: DataConfig | None = None,
    device: str = "cpu",
    png_dir: str | os.PathLike[str] | None = None,
    cs_lambda: float = 1e-3,
    num_unrolls: int | None = None,
) -> dict[str, Any]:
    """Reconstruct ``path``; write ``reconstruction_<method>`` [slices, H, W] to ``out``.

    ``data`` is the run config's data section (mask, acceleration, seed, coil maps, crop:
    :meth:`~recon.config.DataConfig.dataset_kwargs`), the defaults when ``None``. Returns a
    report with per-slice and mean SSIM / NRMSE / PSNR against the fully sampled RSS.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    data = data or DataConfig()
    src = Path(path)
    model = None
    if method == "model":
        if checkpoint is None:
            raise ValueError("--method model needs --checkpoint")
        from recon.models.checkpoint import load_checkpoint

        model, _, _ = load_checkpoint(checkpoint, device)
        model.eval()
    samples = file_samples(src, **data.dataset_kwargs())
    images, rows = [], []
    for s in tqdm(samples, desc=f"{method} {src.name}", leave=False, disable=len(samples) < 4):
        batch = collate([s])
        physics = batch.physics()
        with torch.no_grad():
            if method == "zero-filled":
                img = zero_filled(batch)
            elif method == "model":
                assert model is not None
                x = model(batch.kspace.to(device), physics.to(device), num_unrolls=num_unrolls)
                img = physics.rss(x.cpu())  # type: ignore[union-attr]
            else:
                img = physics.rss(_sigpy_recon(s, method, cs_lambda)[None])
        t = batch.target
        rows.append(
            {
                "slice": s.meta["slice"],
                "ssim": float(ssim(img, t)[0]),
                "nrmse": float(nrmse(img, t)[0]),
                "psnr": float(psnr(img, t)[0]),
            }
        )
        images.append(img[0].numpy())
    dst = Path(out) if out else src.with_name(f"{src.stem}.{method}.h5")
    with atomic_path(dst) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset(f"reconstruction_{method}", data=np.stack(images).astype(np.float32))
        f.attrs["source"] = str(src)
        f.attrs["method"] = method
        f.attrs["accel"] = data.accel
        f.attrs["mask"] = data.mask
        if data.crop:
            f.attrs["crop"] = data.crop
    if png_dir is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        Path(png_dir).mkdir(parents=True, exist_ok=True)
        for row, picture in zip(rows, images):
            plt.imsave(
                Path(png_dir) / f"{src.stem}_s{row['slice']:03d}_{method}.png", picture, cmap="gray"
            )
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("ssim", "nrmse", "psnr")}
    report = {"file": str(src), "method": method, "out": str(dst), "mean": mean, "slices": rows}
    report["report"] = str(dst.with_suffix(".json"))
    dst.with_suffix(".json").write_text(json.dumps(report, indent=2))
    return report
