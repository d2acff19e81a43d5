"""Undersampling masks: determinism, acceleration, fully sampled centre, stable per-slice seeds."""

from __future__ import annotations

import numpy as np
import pytest

from recon.physics.masks import (
    acceleration,
    acs_slice,
    acs_width,
    equispaced_1d_mask,
    make_mask,
    num_acs_lines,
    poisson_2d_mask,
    random_1d_mask,
    slice_seed,
)

ONE_D = [random_1d_mask, equispaced_1d_mask]


@pytest.mark.parametrize("maker", ONE_D)
@pytest.mark.parametrize("w", [32, 48, 64, 368])
@pytest.mark.parametrize("accel", [4, 8])
def test_1d_acceleration_and_acs(maker, w: int, accel: int) -> None:
    mask = maker((40, w), accel=accel, acs_frac=0.08, seed=3)
    assert mask.shape == (40, w) and mask.dtype == np.float32
    assert set(np.unique(mask)) <= {0.0, 1.0}
    assert np.all(mask == mask[:1])  # whole phase-encode lines
    assert acceleration(mask) == pytest.approx(accel, rel=0.12)
    n_acs = num_acs_lines(w, 0.08)
    assert np.all(mask[:, acs_slice(w, 0.08)] == 1)
    assert acs_width(mask) >= n_acs
    assert mask[0, w // 2] == 1  # DC of a centered FFT


def test_paper_setting_r4_8_percent() -> None:
    """Levac et al. 2023, Sec. 3.1: R = 4, centre = 8% of the PE lines (368 lines -> 29 +
    random)."""
    mask = random_1d_mask((640, 368), accel=4, acs_frac=0.08, seed=0)
    assert int(mask[0].sum()) == round(368 / 4)
    assert num_acs_lines(368, 0.08) == 29


@pytest.mark.parametrize("kind", ["random1d", "equispaced1d", "poisson2d"])
def test_deterministic_for_a_seed(kind: str) -> None:
    a = make_mask(kind, (32, 32), 4, 0.08, seed=11)
    b = make_mask(kind, (32, 32), 4, 0.08, seed=11)
    c = make_mask(kind, (32, 32), 4, 0.08, seed=12)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_random_lines_spread_over_seeds() -> None:
    """Outside the ACS, every line is eventually drawn (no fixed pattern)."""
    hits = sum(random_1d_mask((4, 64), 4, 0.08, seed=s)[0] for s in range(200))
    assert np.all(hits > 0)


def test_poisson_2d_acceleration_and_calibration() -> None:
    mask = poisson_2d_mask((48, 40), accel=4, seed=5, acs_frac=0.1)
    assert mask.dtype == np.float32 and mask.shape == (48, 40)
    assert set(np.unique(mask)) <= {0.0, 1.0}
    assert acceleration(mask) == pytest.approx(4, abs=0.2)
    assert np.all(mask[24 - 2 : 24 + 3, 20 - 2 : 20 + 2] == 1)  # central calibration box


def test_make_mask_unknown_kind_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown mask kind 'radial'.*random1d"):
        make_mask("radial", (32, 32))


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="acceleration"):
        random_1d_mask((32, 32), accel=0.5)
    with pytest.raises(ValueError, match="acs_frac"):
        random_1d_mask((32, 32), acs_frac=1.5)
    with pytest.raises(ValueError, match="shape"):
        random_1d_mask((32,))


def test_accel_one_is_fully_sampled() -> None:
    assert random_1d_mask((8, 16), accel=1).all()


def test_slice_seed_is_stable_and_distinct() -> None:
    # A literal: crc32 is the same in every process and Python version (unlike hash()).
    assert slice_seed("file1000001.h5", 3, 0) == 1668512501
    seeds = {slice_seed(f"vol{f}.h5", s, b) for f in range(5) for s in range(20) for b in (0, 1)}
    assert len(seeds) == 5 * 20 * 2


def test_acs_width() -> None:
    m = np.zeros((4, 20), np.float32)
    m[:, 8:13] = 1
    m[:, 2] = 1
    assert acs_width(m) == 5
    m[:, 10] = 0
    assert acs_width(m) == 0
