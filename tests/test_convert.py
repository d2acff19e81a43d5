"""``fedunroll convert``: ISMRMRD raw data, MATLAB v7.3 and other h5 layouts -> fastMRI layout.

Every source is written here from a known complex array ``[slices, coils, H, W]`` (H readout,
W phase encode) and the converted file must give it back.

MATLAB v7.3 convention (what :func:`write_mat73` writes, as MATLAB does): a ``.mat`` file is HDF5
with a 512-byte text header; complex arrays are a compound of ``real``/``imag``; MATLAB is
column-major, so a variable of ``size(kspace) == [H W coils slices]`` is stored as an HDF5
dataset of shape ``(slices, coils, W, H)`` (the axes reversed).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import h5py
import ismrmrd
import ismrmrd.xsd as xsd
import numpy as np
import pytest

from fedunroll.cli import main
from recon.data.checks import DataError, DataWarning
from recon.data.convert import convert, read_source
from recon.data.h5io import read_volume
from recon.physics.coils import np_fft2c

README = Path(__file__).resolve().parents[1] / "README.md"


def phantom_kspace(slices: int = 2, coils: int = 3, h: int = 40, w: int = 32) -> np.ndarray:
    """Centred, fully sampled k-space ``[S, C, H, W]`` of an ellipse seen by smooth coils."""
    rng = np.random.default_rng(0)
    y, x = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    out = np.empty((slices, coils, h, w), np.complex64)
    for s in range(slices):
        img = 0.5 * (1 + np.tanh((1 - np.sqrt((x / 0.6) ** 2 + (y / 0.75) ** 2)) * 10))
        img = img * (1 + 0.2 * s) * np.exp(0.4j * x)
        ang = 2 * np.pi * np.arange(coils) / coils
        maps = np.stack(
            [np.exp(-((x - 1.3 * np.cos(a)) ** 2 + (y - 1.3 * np.sin(a)) ** 2) / 1.5) for a in ang]
        )
        k = np_fft2c(maps * img)
        out[s] = k + 0.002 * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape))
    return out


# --- writers of the source formats -----------------------------------------------------------


def write_mat73(path: Path, **variables: np.ndarray) -> Path:
    """A MATLAB v7.3 MAT-file holding ``variables`` given in MATLAB's axis order (``size()``):
    complex as a ``real``/``imag`` compound, dimensions reversed, MATLAB's 512-byte header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w", userblock_size=512) as f:
        for name, arr in variables.items():
            stored = np.asarray(arr).T  # MATLAB (column-major) -> HDF5 shape reversed
            if np.iscomplexobj(stored):
                comp = np.empty(stored.shape, np.dtype([("real", "<f8"), ("imag", "<f8")]))
                comp["real"], comp["imag"] = stored.real, stored.imag
                stored = comp
            ds = f.create_dataset(name, data=stored)
            ds.attrs["MATLAB_class"] = np.bytes_("double")
    text = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 "
    text += b"schema 1.00 ."
    header = text.ljust(116) + b"\x00" * 8 + b"\x00\x02" + b"IM"
    with open(path, "r+b") as f:
        f.write(header)
    return path


def ismrmrd_header(h: int, w: int, slices: int, centre: int | None = None) -> str:
    limits = xsd.encodingLimitsType(
        kspace_encoding_step_1=xsd.limitType(
            minimum=0, maximum=w - 1, center=w // 2 if centre is None else centre
        ),
        slice=xsd.limitType(minimum=0, maximum=slices - 1, center=0),
    )
    space = xsd.encodingSpaceType(
        matrixSize=xsd.matrixSizeType(x=h, y=w, z=1),
        fieldOfView_mm=xsd.fieldOfViewMm(x=220.0, y=176.0, z=5.0),
    )
    header = xsd.ismrmrdHeader(
        experimentalConditions=xsd.experimentalConditionsType(H1resonanceFrequency_Hz=127_740_000),
        acquisitionSystemInformation=xsd.acquisitionSystemInformationType(
            systemFieldStrength_T=3.0
        ),
        encoding=[
            xsd.encodingType(
                encodedSpace=space,
                reconSpace=space,
                encodingLimits=limits,
                trajectory=xsd.trajectoryType.CARTESIAN,
            )
        ],
    )
    return str(xsd.ToXML(header))


def write_ismrmrd(
    path: Path,
    kspace: np.ndarray,
    lines: list[int] | None = None,
    repeat: dict[int, np.ndarray] | None = None,
    seed: int = 0,
) -> str:
    """ISMRMRD raw data of ``kspace [S, C, H, W]``: one acquisition per (slice, phase-encode
    line), in shuffled order, lines ``lines`` only (default all), a noise scan first; lines in
    ``repeat`` are acquired a second time with that data (``average`` 1). Returns the XML."""
    s_n, c_n, h, w = kspace.shape
    xml = ismrmrd_header(h, w, s_n)
    path.parent.mkdir(parents=True, exist_ok=True)
    dset = ismrmrd.Dataset(str(path), "dataset", create_if_needed=True)
    dset.write_xml_header(xml)
    rng = np.random.default_rng(seed)
    noise = ismrmrd.Acquisition.from_array(
        (rng.standard_normal((c_n, h)) + 1j * rng.standard_normal((c_n, h))).astype(np.complex64)
    )
    noise.set_flag(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)
    dset.append_acquisition(noise)
    order = [(s, e) for s in range(s_n) for e in (range(w) if lines is None else lines)]
    for i in rng.permutation(len(order)):
        s, e = order[i]
        acq = ismrmrd.Acquisition.from_array(
            np.ascontiguousarray(kspace[s, :, :, e]), center_sample=h // 2
        )
        acq.idx.kspace_encode_step_1 = e
        acq.idx.slice = s
        dset.append_acquisition(acq)
    for e, data in (repeat or {}).items():
        acq = ismrmrd.Acquisition.from_array(data.astype(np.complex64), center_sample=h // 2)
        acq.idx.kspace_encode_step_1 = e
        acq.idx.average = 1
        dset.append_acquisition(acq)
    dset.close()
    return xml


# --- ISMRMRD ---------------------------------------------------------------------------------


def test_ismrmrd_fully_sampled_round_trip(tmp_path: Path) -> None:
    k = phantom_kspace()
    xml = write_ismrmrd(tmp_path / "meas.h5", k)
    rep = convert(tmp_path / "meas.h5", tmp_path / "out.h5")
    assert rep.source_format == "ismrmrd" and rep.shape == (2, 3, 40, 32)
    assert rep.checks.ran == ["layout", "finite", "centred", "sampling"]
    assert rep.checks.findings == []
    assert "64 of 65 acquisitions placed into 2 slice(s)" in rep.notes[0]
    vol = read_volume(tmp_path / "out.h5")
    np.testing.assert_array_equal(vol.kspace, k)
    assert vol.header == xml and vol.attrs["source_format"] == "ismrmrd"
    assert vol.attrs["field_strength"] == 3.0 and vol.attrs["source"] == "meas.h5"


def test_ismrmrd_missing_lines_are_zero_filled_and_repeats_averaged(tmp_path: Path) -> None:
    k = phantom_kspace(slices=1)
    acquired = [0, 3, 8, 14, 15, 16, 17, 22, 27]
    extra = 3 * k[0, :, :, 16]
    write_ismrmrd(tmp_path / "meas.h5", k, lines=acquired, repeat={16: extra})
    rep = convert(tmp_path / "meas.h5", tmp_path / "out.h5")
    expected = np.zeros_like(k)
    expected[..., acquired] = k[..., acquired]
    expected[0, :, :, 16] = (k[0, :, :, 16] + extra) / 2
    with pytest.warns(DataWarning, match=r"measured acceleration R=3.56 is above the coil count 3"):
        got = read_volume(tmp_path / "out.h5", expect_full=False).kspace
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert any("1 line(s) acquired more than once were averaged" in n for n in rep.notes)
    # already undersampled: converted (for prospective reconstruction), and said so
    assert [f.check for f in rep.checks.findings] == ["sampling", "accel"]
    assert "9 of 32 lines acquired" in str(rep.checks.findings[0])


def test_ismrmrd_3d_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vol3d.h5"
    dset = ismrmrd.Dataset(str(path), "dataset", create_if_needed=True)
    dset.write_xml_header(ismrmrd_header(16, 16, 1))
    acq = ismrmrd.Acquisition.from_array(np.ones((2, 16), np.complex64))
    acq.idx.kspace_encode_step_2 = 3
    dset.append_acquisition(acq)
    dset.close()
    with pytest.raises(DataError, match=r"vol3d\.h5: field 'data': 3D acquisition"):
        convert(path, tmp_path / "out.h5")


def test_ismrmrd_file_given_to_prepare_points_to_convert(tmp_path: Path) -> None:
    write_ismrmrd(tmp_path / "site0" / "train" / "meas.h5", phantom_kspace(slices=1))
    with pytest.raises(DataError, match=r"ISMRMRD raw-data file.*fedunroll convert meas\.h5"):
        read_volume(tmp_path / "site0" / "train" / "meas.h5")


# --- MATLAB v7.3 -----------------------------------------------------------------------------


def test_matlab_default_layout_round_trip(tmp_path: Path) -> None:
    k = phantom_kspace()
    mat = np.transpose(k, (2, 3, 1, 0))  # kspace(kx, ky, coil, slice): size [H W C S]
    path = write_mat73(tmp_path / "scan.mat", kspace=mat, TR=np.array([[2.3]]))
    with h5py.File(path) as f:  # the convention the converter undoes
        assert f["kspace"].shape == (2, 3, 32, 40) and f["kspace"].dtype.names == ("real", "imag")
    rep = convert(path, tmp_path / "scan.h5")
    assert (rep.source_format, rep.variable, rep.layout) == ("matlab", "kspace", "hwcs")
    np.testing.assert_array_equal(read_volume(tmp_path / "scan.h5").kspace, k)


@pytest.mark.parametrize(
    ("layout", "perm"),
    [
        ("hwsc", (2, 3, 0, 1)),  # kspace(kx, ky, slice, coil)
        ("cwhs", (1, 3, 2, 0)),  # coils first, phase encode before readout
        ("hwc", None),  # one slice, no slice axis
    ],
)
def test_matlab_layouts_by_name(tmp_path: Path, layout: str, perm: tuple[int, ...] | None) -> None:
    k = phantom_kspace(slices=1 if perm is None else 2)
    mat = np.transpose(k[0], (1, 2, 0)) if perm is None else np.transpose(k, perm)
    path = write_mat73(tmp_path / "scan.mat", raw=mat, other=mat[..., :1] * 2)
    convert(path, tmp_path / "scan.h5", var="raw", layout=layout)
    np.testing.assert_array_equal(read_volume(tmp_path / "scan.h5").kspace, k)


def test_matlab_variable_auto_detected_or_asked_for(tmp_path: Path) -> None:
    k = phantom_kspace()
    mat = np.transpose(k, (2, 3, 1, 0))
    one = write_mat73(tmp_path / "one.mat", ksp_data=mat, TR=np.array([[2.3]]))
    assert read_source(one).variable == "ksp_data"  # the only complex variable
    two = write_mat73(tmp_path / "two.mat", a=mat, b=mat)
    with pytest.raises(DataError) as info:
        read_source(two)
    assert info.value.field == "var" and "several complex variables" in info.value.reason
    assert "a (complex (2, 3, 32, 40))" in info.value.reason and "--var NAME" in info.value.reason
    with pytest.raises(DataError, match=r"two\.mat: field 'c': no such variable"):
        read_source(two, var="c")


def test_matlab_misplaced_coil_axis_suggests_the_layout(tmp_path: Path) -> None:
    k = phantom_kspace(slices=2, coils=3, h=40, w=32)
    mat = np.transpose(k, (1, 2, 3, 0))  # kspace(coil, kx, ky, slice), read as hwcs by default
    with pytest.raises(DataError) as info:
        read_source(write_mat73(tmp_path / "scan.mat", kspace=mat))
    assert "looks like [slices, H, coils, W] (3 coils of 32x40)" in info.value.reason
    assert "pass --layout chws (MATLAB size() order)" in info.value.reason
    convert(tmp_path / "scan.mat", tmp_path / "scan.h5", layout="chws")
    np.testing.assert_array_equal(read_volume(tmp_path / "scan.h5").kspace, k)


def test_matlab_v5_file_is_explained(tmp_path: Path) -> None:
    path = tmp_path / "old.mat"
    path.write_bytes(b"MATLAB 5.0 MAT-file, Platform: GLNXA64".ljust(128) + b"\x00" * 64)
    with pytest.raises(DataError, match=r"old\.mat: field 'file': a MATLAB v5/v7 .*'-v7\.3'"):
        convert(path, tmp_path / "old.h5")


# --- other h5 layouts ------------------------------------------------------------------------


def test_coil_last_h5_converts_with_layout(tmp_path: Path) -> None:
    k = phantom_kspace(coils=4, h=32, w=32)
    src = tmp_path / "coil_last.h5"
    with h5py.File(src, "w") as f:
        f.create_dataset("kspace", data=np.moveaxis(k, 1, -1))  # [S, H, W, C]
        f.attrs["acquisition"] = "AXT1"
    with pytest.raises(DataError, match=r"looks like \[slices, H, W, coils\].*--layout shwc"):
        convert(src, tmp_path / "out.h5")
    assert not (tmp_path / "out.h5").exists()
    convert(src, tmp_path / "out.h5", layout="shwc")
    vol = read_volume(tmp_path / "out.h5")
    np.testing.assert_array_equal(vol.kspace, k)
    assert vol.attrs["acquisition"] == "AXT1" and vol.attrs["source_format"] == "h5"


def test_real_imag_axis_h5(tmp_path: Path) -> None:
    k = phantom_kspace()
    src = tmp_path / "pairs.h5"
    with h5py.File(src, "w") as f:
        f.create_dataset("data", data=np.stack([k.real, k.imag], axis=-1).astype(np.float32))
    with pytest.raises(DataError, match="no complex variable"):
        convert(src, tmp_path / "out.h5")
    rep = convert(src, tmp_path / "out.h5", var="data")
    assert rep.layout == "schwr"
    np.testing.assert_array_equal(read_volume(tmp_path / "out.h5").kspace, k)


def test_uncentred_source_is_refused_then_fixed_by_fftshift(tmp_path: Path) -> None:
    k = phantom_kspace()
    src = tmp_path / "shifted.mat"
    write_mat73(src, kspace=np.transpose(np.fft.ifftshift(k, axes=(-2, -1)), (2, 3, 1, 0)))
    with pytest.raises(DataError, match=r"shifted\.mat: field 'kspace': k-space is not centred"):
        convert(src, tmp_path / "out.h5")
    assert not (tmp_path / "out.h5").exists()
    rep = convert(src, tmp_path / "out.h5", fftshift=True)
    assert "k-space fftshift-ed over H and W" in rep.notes
    np.testing.assert_allclose(read_volume(tmp_path / "out.h5").kspace, k)


def test_bad_layout_and_output_are_named(tmp_path: Path) -> None:
    src = write_mat73(tmp_path / "scan.mat", kspace=np.transpose(phantom_kspace(), (2, 3, 1, 0)))
    with pytest.raises(DataError, match=r"bad --layout 'hwxs'.*s=slices"):
        convert(src, tmp_path / "out.h5", layout="hwxs")
    with pytest.raises(DataError, match=r"out\.mat: field 'file': the output must end in \.h5"):
        convert(src, tmp_path / "out.mat")
    convert(src, tmp_path / "out.h5")
    with pytest.raises(DataError, match=r"out\.h5: field 'file': exists.*--overwrite"):
        convert(src, tmp_path / "out.h5")
    convert(src, tmp_path / "out.h5", overwrite=True)


# --- the command line and README's worked example --------------------------------------------


def test_convert_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_mat73(tmp_path / "scan.mat", kspace=np.transpose(phantom_kspace(), (2, 3, 1, 0)))
    assert main(["convert", str(src), str(tmp_path / "scan.h5")]) == 0
    out = capsys.readouterr().out
    assert "kspace [2, 3, 40, 32] [slices, coils, H, W] from matlab 'kspace', layout hwcs" in out
    assert "checked layout [slices, coils, H, W], finite values, k-space centred" in out
    assert main(["convert", str(src), str(tmp_path / "scan.h5"), "--layout", "hw"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fedunroll convert: error: scan.h5: field")


def readme_example() -> list[str]:
    """The ``fedunroll`` lines of README's worked example (section "Bring your own data")."""
    text = README.read_text()
    start = text.index("### Worked example")
    block = re.search(r"```bash\n(.*?)```", text[start:], re.S)
    assert block is not None
    lines = [ln.split("  #")[0].strip() for ln in block.group(1).splitlines()]
    return [ln for ln in lines if ln.startswith("fedunroll ")]


def test_readme_worked_example(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Runs README's commands as written, on the small files its text describes."""
    monkeypatch.chdir(tmp_path)
    k = phantom_kspace(slices=2, coils=4, h=48, w=40)
    write_mat73(Path("scan.mat"), kspace=np.transpose(k, (2, 3, 1, 0)))
    write_ismrmrd(Path("meas.h5"), k)
    with h5py.File("coil_last.h5", "w") as f:
        f.create_dataset("kspace", data=np.moveaxis(k, 1, -1))
    commands = readme_example()
    assert len(commands) >= 4
    for line in commands:
        assert main(shlex.split(line)[1:]) == 0, (line, capsys.readouterr().err)
    out = capsys.readouterr().out
    assert "checked layout [slices, coils, H, W]" in out and "0 reused" in out
    for name in ("scan.h5", "meas.h5", "coil_last.h5"):
        np.testing.assert_array_equal(read_volume(Path("mysite/train") / name).kspace, k)
