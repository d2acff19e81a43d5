"""Robust aggregation maths: hand-computed small cases, loop/numpy references, hostile updates."""

import math

import numpy as np
import pytest

from strategies import robust

RNG = np.random.default_rng(0)


def _model(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A small state_dict-like dict: conv weight, bias (float64), BN buffers (int counter)."""
    return {
        "conv.weight": rng.standard_normal((4, 2, 3, 3)).astype(np.float32),
        "conv.bias": rng.standard_normal(4),  # float64
        "bn.running_mean": rng.standard_normal(4).astype(np.float16),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
        "mask": np.array([True, False, True]),
    }


def _hostile(like: dict[str, np.ndarray], value: float = 1e30) -> dict[str, np.ndarray]:
    """Every float array filled with ``value`` (float16 saturates at its own maximum)."""
    out = {}
    for k, a in like.items():
        if a.dtype.kind == "f":
            out[k] = np.full_like(a, min(value, float(np.finfo(a.dtype).max)))
        else:
            out[k] = a.copy()
    return out


def _w(*rows: list[float]) -> list[dict[str, np.ndarray]]:
    return [{"w": np.array(r, np.float32)} for r in rows]


def _assert_layout(out: dict[str, np.ndarray], like: dict[str, np.ndarray]) -> None:
    assert list(out) == list(like)
    for k, a in like.items():
        assert out[k].dtype == a.dtype, k
        assert out[k].shape == a.shape, k
        if a.dtype.kind == "f":
            assert np.isfinite(out[k]).all(), k


# --- coordinate_median ----------------------------------------------------------------------


def test_coordinate_median_by_hand():
    ups = _w([1, 5], [2, -1], [10, 0])
    np.testing.assert_array_equal(robust.coordinate_median(ups)["w"], [2, 0])
    # Even n: the mean of the two middle values (1, 2, 4, 10 -> 3; -1, 0, 3, 5 -> 1.5).
    ups.append({"w": np.array([4, 3], np.float32)})
    np.testing.assert_array_equal(robust.coordinate_median(ups)["w"], [3, 1.5])


def test_coordinate_median_matches_np_median_and_keeps_layout():
    for n in (1, 2, 5, 6):
        ups = [_model(RNG) for _ in range(n)]
        out = robust.coordinate_median(ups)
        _assert_layout(out, ups[0])
        for k in ("conv.weight", "conv.bias", "bn.running_mean"):
            ref = np.median(np.stack([u[k].astype(np.float64) for u in ups]), axis=0)
            np.testing.assert_array_equal(out[k], ref.astype(ups[0][k].dtype))
        assert out["bn.num_batches_tracked"] == 7
        np.testing.assert_array_equal(out["mask"], [True, False, True])


def test_coordinate_median_ignores_a_1e30_minority():
    honest = [_model(RNG) for _ in range(4)]
    out = robust.coordinate_median([*honest, _hostile(honest[0])])
    _assert_layout(out, honest[0])
    stack = np.stack([u["conv.weight"] for u in honest])
    assert (out["conv.weight"] <= stack.max(0)).all() and (out["conv.weight"] >= stack.min(0)).all()


# --- trimmed_mean ---------------------------------------------------------------------------


def test_trimmed_mean_by_hand():
    ups = _w([1, 0], [2, 0], [3, 0], [4, 0], [100, 30])
    # beta = 0.2, n = 5: drop 1 at each end -> mean(2, 3, 4) = 3 and mean(0, 0, 0) = 0.
    np.testing.assert_array_equal(robust.trimmed_mean(ups, 0.2)["w"], [3, 0])
    # floor(0.1 * 5) = 0: the plain mean.
    np.testing.assert_allclose(robust.trimmed_mean(ups, 0.1)["w"], [22, 6])
    np.testing.assert_allclose(robust.trimmed_mean(ups, 0.0)["w"], [22, 6])


def _trimmed_mean_loop(values: list[np.ndarray], beta: float) -> np.ndarray:
    """Per-coordinate reference: Python sort, slice, fsum."""
    n = len(values)
    b = int(beta * n)
    flat = [v.astype(np.float64).ravel() for v in values]
    out = []
    for j in range(flat[0].size):
        kept = sorted(float(f[j]) for f in flat)[b : n - b]
        out.append(math.fsum(kept) / len(kept))
    return np.array(out).reshape(values[0].shape)


@pytest.mark.parametrize(("n", "beta"), [(5, 0.2), (7, 0.3), (6, 0.49), (4, 0.0)])
def test_trimmed_mean_matches_loop_reference_and_keeps_layout(n, beta):
    ups = [_model(RNG) for _ in range(n)]
    out = robust.trimmed_mean(ups, beta)
    _assert_layout(out, ups[0])
    for k in ("conv.weight", "conv.bias", "bn.running_mean"):
        ref = _trimmed_mean_loop([u[k] for u in ups], beta).astype(ups[0][k].dtype)
        np.testing.assert_allclose(out[k], ref, rtol=1e-6 if ref.dtype != np.float16 else 1e-3)
    assert out["bn.num_batches_tracked"] == 7


def test_trimmed_mean_drops_a_1e30_update():
    honest = [_model(RNG) for _ in range(4)]
    out = robust.trimmed_mean([*honest, _hostile(honest[0])], 0.2)
    _assert_layout(out, honest[0])
    assert np.abs(out["conv.weight"]).max() < 10


@pytest.mark.parametrize("beta", [-0.1, 0.5, 0.7, float("nan"), "0.1"])
def test_trimmed_mean_rejects_bad_beta(beta):
    with pytest.raises(ValueError, match="beta"):
        robust.trimmed_mean(_w([1], [2], [3]), beta)


# --- Krum / multi-Krum ----------------------------------------------------------------------


def test_krum_scores_by_hand():
    # 1-D points 0, 1, 3, 10; f = 0 -> each score sums the n - f - 2 = 2 nearest squared distances:
    # 0: 1 + 9 = 10; 1: 1 + 4 = 5; 3: 4 + 9 = 13; 10: 49 + 81 = 130.
    ups = _w([0], [1], [3], [10])
    np.testing.assert_array_equal(robust.krum_scores(ups, 0), [10, 5, 13, 130])
    assert robust.multi_krum_selection([10, 5, 13, 130], 2) == [1, 0]
    np.testing.assert_array_equal(robust.multi_krum(ups, 0, 1)["w"], [1])  # Krum
    np.testing.assert_array_equal(robust.multi_krum(ups, 0, 2)["w"], [0.5])
    np.testing.assert_array_equal(robust.multi_krum(ups, 0, 4)["w"], [3.5])  # m = n: the mean


def test_krum_scores_match_a_brute_force_reference():
    ups = [_model(RNG) for _ in range(7)]
    f = 2
    flat = [
        np.concatenate([u[k].astype(np.float64).ravel() for k in u if u[k].dtype.kind == "f"])
        for u in ups
    ]
    ref = []
    for i in range(7):
        d = sorted(float(np.sum((flat[i] - flat[j]) ** 2)) for j in range(7) if j != i)
        ref.append(sum(d[: 7 - f - 2]))
    np.testing.assert_allclose(robust.krum_scores(ups, f), ref, rtol=1e-12)


def test_multi_krum_excludes_one_1e30_update_among_five_honest():
    honest = [_model(RNG) for _ in range(5)]
    ups = [honest[0], honest[1], _hostile(honest[0]), *honest[2:]]
    scores = robust.krum_scores(ups, 1)
    assert np.isfinite(scores).all() and int(np.argmax(scores)) == 2
    out = robust.multi_krum(ups, num_byzantine=1, m=5)
    _assert_layout(out, honest[0])
    for k in ("conv.weight", "conv.bias", "bn.running_mean"):
        ref = np.mean([u[k].astype(np.float64) for u in honest], axis=0).astype(honest[0][k].dtype)
        np.testing.assert_allclose(out[k], ref, rtol=1e-12)  # summed in score order
    assert out["bn.num_batches_tracked"] == 7


def test_multi_krum_integer_arrays_are_the_majority_of_the_selected():
    ups = [{"w": np.array([0.0, float(i)]), "n": np.array([5, i % 2], np.int64)} for i in range(5)]
    # Points 0..4 on a line, f = 1: scores sum the 2 nearest squared distances = 5, 2, 2, 2, 5.
    np.testing.assert_array_equal(robust.krum_scores(ups, 1), [5, 2, 2, 2, 5])
    keep = robust.multi_krum_selection(robust.krum_scores(ups, 1), 3)
    assert keep == [1, 2, 3]  # ties go to the lower index
    out = robust.multi_krum(ups, 1, 3)
    np.testing.assert_array_equal(out["n"], [5, 1])  # i % 2 over {1, 2, 3} = {1, 0, 1}
    np.testing.assert_array_equal(out["w"], [0, 2])


@pytest.mark.parametrize(
    ("n", "f", "m", "match"),
    [
        (4, 1, 1, "num_byzantine"),  # needs n > 2f + 2 = 4
        (5, -1, 1, "num_byzantine"),
        (5, 1.0, 1, "num_byzantine"),
        (5, 1, 0, "m must"),
        (5, 1, 5, "m must"),  # m <= n - f = 4
    ],
)
def test_multi_krum_rejects_bad_parameters(n, f, m, match):
    ups = _w(*[[float(i)] for i in range(n)])
    with pytest.raises(ValueError, match=match):
        robust.multi_krum(ups, f, m)


# --- norms ----------------------------------------------------------------------------------


def test_clip_to_norm_by_hand():
    delta = {"w": np.array([3.0, 0.0], np.float32), "b": np.array([4.0]), "n": np.array(2)}
    out = robust.clip_to_norm(delta, 1.0)  # global norm 5 -> factor 1/5
    np.testing.assert_allclose(out["w"], [0.6, 0.0], rtol=1e-6)
    np.testing.assert_allclose(out["b"], [0.8])
    assert out["n"] == 2
    _assert_layout(out, delta)
    same = robust.clip_to_norm(delta, 10.0)  # already within the bound: unchanged
    for k in delta:
        np.testing.assert_array_equal(same[k], delta[k])


def test_clip_to_norm_of_a_1e30_delta_is_finite_with_the_bound():
    delta = {"w": np.full((8, 8), 1e30, np.float32), "b": np.array([-1e30], np.float32)}
    out = robust.clip_to_norm(delta, 2.0)
    _assert_layout(out, delta)
    assert robust.global_norm(out) == pytest.approx(2.0, rel=1e-6)
    # A float64 delta whose squared norm overflows float64 still clips.
    big = {"w": np.array([1e200, -1e200])}
    np.testing.assert_allclose(robust.clip_to_norm(big, math.sqrt(2))["w"], [1, -1])


def test_global_norm_and_update_norms():
    assert robust.global_norm({"a": np.array([3.0]), "b": np.array([[4.0]]), "n": np.array(9)}) == 5
    assert robust.global_norm({"w": np.array([1e200, 1e200])}) == pytest.approx(
        math.sqrt(2) * 1e200
    )
    assert robust.global_norm({"w": np.zeros(3)}) == 0
    x = {"w": np.array([1.0, 1.0], np.float32), "n": np.array(3)}
    ups = [
        {"w": np.array([4.0, 5.0], np.float32), "n": np.array(4)},  # ||(3, 4)|| = 5
        {"w": np.array([1.0, 1.0], np.float32), "n": np.array(4)},  # unchanged: 0
        _hostile(x),
    ]
    norms = robust.update_norms(ups, x)
    assert norms.dtype == np.float64 and np.isfinite(norms).all()
    np.testing.assert_allclose(norms[:2], [5, 0])
    assert norms[2] == pytest.approx(math.sqrt(2) * 1e30, rel=1e-6)
    ref = [np.linalg.norm(u["w"].astype(np.float64) - x["w"]) for u in ups]
    np.testing.assert_allclose(norms, ref, rtol=1e-12)


def test_update_norms_of_a_float64_overflow_is_inf_not_nan():
    x = {"w": np.array([-1.7e308])}
    norms = robust.update_norms([{"w": np.array([1.7e308])}, {"w": np.array([-1.6e308])}], x)
    assert norms[0] == math.inf and np.isfinite(norms[1])
    assert robust.norm_outliers(norms, 3.0) == [0]


def test_norm_outliers_by_hand():
    # Lower median of (1, 2, 3, 100) is 2: with factor 10 only 100 > 20 is flagged.
    assert robust.norm_outliers([1.0, 2.0, 3.0, 100.0], 10.0) == [3]
    assert robust.norm_outliers([1.0, 2.0, 3.0, 100.0], 50.0) == []
    assert robust.norm_outliers([1.0, 2.0, 3.0, 100.0], 1.0) == [2, 3]  # strictly above
    assert robust.norm_outliers([], 3.0) == []
    assert robust.norm_outliers([1.0, float("nan"), float("inf")], 3.0) == [1, 2]
    assert robust.norm_outliers([0.0, 0.0, 1e-3], 3.0) == [2]  # lower median 0: all that moved


def test_norm_outliers_flags_a_1e30_update_in_a_two_site_round():
    x = _model(RNG)
    honest = {k: (a + 0.01).astype(a.dtype) if a.dtype.kind == "f" else a for k, a in x.items()}
    norms = robust.update_norms([honest, _hostile(x)], x)
    assert robust.norm_outliers(norms, 3.0) == [1]
    assert robust.norm_outliers(norms[::-1], 3.0) == [0]
    # The usual median (a + b) / 2 would follow the hostile site and flag nothing.
    assert not norms[1] > 3.0 * np.median(norms)


def test_norm_outliers_flags_nothing_within_a_factor_of_three():
    for n in (2, 3, 6):
        norms = RNG.uniform(1.0, 3.0, size=n)
        assert robust.norm_outliers(norms, 3.0) == []


@pytest.mark.parametrize("factor", [0.5, 0.0, -1.0, float("inf"), float("nan"), "3"])
def test_factors_are_validated(factor):
    with pytest.raises(ValueError, match="factor"):
        robust.norm_outliers([1.0, 2.0], factor)
    with pytest.raises(ValueError, match="factor"):
        robust.cap_examples([1, 2], factor)


@pytest.mark.parametrize("max_norm", [0.0, -1.0, float("inf"), float("nan")])
def test_clip_to_norm_rejects_bad_max_norm(max_norm):
    with pytest.raises(ValueError, match="max_norm"):
        robust.clip_to_norm({"w": np.ones(2)}, max_norm)


def test_norm_outliers_rejects_negative_norms():
    with pytest.raises(ValueError, match="norms"):
        robust.norm_outliers([1.0, -2.0], 3.0)


# --- cap_examples ---------------------------------------------------------------------------


def test_cap_examples_by_hand():
    # Lower median of (100, 120, 1e12) is 120; cap 2 x 120 = 240.
    assert robust.cap_examples([100, 120, 10**12], 2.0) == [100, 120, 240]
    assert robust.cap_examples([100, 10**12], 2.0) == [100, 200]  # two sites: the smaller
    assert robust.cap_examples([10**12, 100], 1.5) == [150, 100]
    assert robust.cap_examples([100, 110, 120], 2.0) == [100, 110, 120]  # honest: unchanged
    assert robust.cap_examples([np.int64(3), 4], 1.0) == [3, 3]
    assert robust.cap_examples([], 2.0) == []


@pytest.mark.parametrize("counts", [[0, 1], [-3, 1], [1.5, 2], [True, 2]])
def test_cap_examples_rejects_bad_counts(counts):
    with pytest.raises(ValueError, match="num_examples"):
        robust.cap_examples(counts, 2.0)


# --- malformed updates ----------------------------------------------------------------------


def test_malformed_updates_raise():
    a = {"w": np.ones(2, np.float32)}
    cases = [
        [],
        [a, {"v": np.ones(2, np.float32)}],
        [a, {"w": np.ones(3, np.float32)}],
        [a, {"w": np.ones(2, np.float64)}],
        [a, {"w": np.array([1.0, np.nan], np.float32)}],
        [a, {"w": np.array([1.0, np.inf], np.float32)}],
        [{"w": np.ones(2, np.complex64)}] * 2,
    ]
    for ups in cases:
        for fn in (
            robust.coordinate_median,
            lambda u: robust.trimmed_mean(u, 0.1),
            lambda u: robust.update_norms(u, a),
        ):
            with pytest.raises(ValueError):
                fn(ups)
    with pytest.raises(ValueError, match=r"update 2\['w'\]: shape"):
        robust.coordinate_median([a, a, {"w": np.ones(3, np.float32)}])
    with pytest.raises(ValueError, match=r"reference\['w'\]: shape"):
        robust.update_norms([a], {"w": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match="delta"):
        robust.clip_to_norm({"w": np.array([np.nan])}, 1.0)


def test_majority_of_integer_and_bool_arrays():
    ups = [
        {"w": np.zeros(1), "n": np.array([3, 1, 2], np.int32), "b": np.array([True, False])},
        {"w": np.zeros(1), "n": np.array([3, 2, 1], np.int32), "b": np.array([True, True])},
        {"w": np.zeros(1), "n": np.array([5, 2, 9], np.int32), "b": np.array([False, True])},
    ]
    out = robust.coordinate_median(ups)
    np.testing.assert_array_equal(out["n"], [3, 2, 1])  # last column: 1, 2, 9 tie -> smallest
    assert out["n"].dtype == np.int32
    np.testing.assert_array_equal(out["b"], [True, True])
    assert out["b"].dtype == np.bool_
