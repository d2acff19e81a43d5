"""Architecture search core: operations, cells, MiLeNAS step, derivation, genotype files, cost."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Subset

from recon.data import SiteDataset, generate_sites
from recon.data.sample import collate
from recon.models.denoisers import build_denoiser, count_parameters
from recon.models.unrolled import MoDL
from recon.nas import (
    PRIMITIVES,
    PUBLISHED,
    DerivedNet,
    Genotype,
    MixedOp,
    SearchDenoiser,
    alpha_state,
    arch_parameters,
    build_from_genotype,
    build_nas_denoiser,
    build_search_denoiser,
    count_conv_macs,
    denoiser_cost,
    derive_genotype,
    load_alpha_state,
    make_op,
    model_genotype,
    unrolled_cost,
    weight_parameters,
)
from recon.train.losses import get_loss
from recon.train.milenas import empirical_risk, milenas_grads, milenas_train, split_train_val

C = 4  # feature maps in the tiny test networks


def _sep_params(c: int, k: int) -> int:
    return c * k * k + c + c * c + c  # depthwise (+bias), pointwise (+bias)


def _std_params(c: int, k: int) -> int:
    return c * c * k * k + c


@pytest.mark.parametrize("name", PRIMITIVES)
def test_every_candidate_keeps_the_shape(name: str) -> None:
    op = make_op(name, C)
    x = torch.randn(2, C, 12, 10)
    assert op(x).shape == x.shape
    kind, k = name.split("_conv_")[0], int(name[-1])
    expected = _sep_params(C, k) if kind == "sep" else _std_params(C, 3 if "dil" in kind else k)
    assert count_parameters(op) == expected


def test_unknown_operation_is_named() -> None:
    with pytest.raises(ValueError, match="conv_9x9"):
        make_op("conv_9x9", C)


def test_mixed_op_is_the_softmax_weighted_sum() -> None:
    torch.manual_seed(0)
    mixed = MixedOp(C)
    x = torch.randn(1, C, 8, 8)
    alpha = torch.randn(len(PRIMITIVES))
    w = torch.softmax(alpha, 0)
    expected = sum(w[o] * mixed.ops[o](x) for o in range(len(PRIMITIVES)))
    torch.testing.assert_close(mixed(x, w), expected)
    onehot = torch.zeros(len(PRIMITIVES))
    onehot[3] = 1.0
    torch.testing.assert_close(mixed(x, onehot), mixed.ops[3](x))


def test_alpha_is_not_in_the_shipped_weights() -> None:
    den = build_search_denoiser(channels=C, num_cells=2)
    model = MoDL(den, num_unrolls=2, cg_iters=2)
    net = den.net
    assert isinstance(net, SearchDenoiser)
    alphas = arch_parameters(model)
    assert [tuple(a.shape) for a in alphas] == [(2, 8), (3, 8), (4, 8)]
    ids = {id(p) for p in model.parameters()}
    assert not any(id(a) in ids for a in alphas)
    assert not any("alpha" in k for k in model.state_dict())
    assert {id(p) for p in weight_parameters(model)} == ids
    assert "log_lam" in model.state_dict()
    # .to() keeps the same α objects when nothing changes (optimisers stay valid) ...
    model.to("cpu")
    assert all(a is b for a, b in zip(alphas, arch_parameters(model)))
    # ... and converts α with the module otherwise
    model.double()
    assert all(a.dtype == torch.float64 and a.requires_grad for a in arch_parameters(model))


def test_alpha_moves_with_the_model_and_gets_gradients(device: str) -> None:
    torch.manual_seed(0)
    net = SearchDenoiser(C, num_cells=1).to(device)
    alphas = net.arch_parameters()
    assert all(a.device.type == device and a.is_leaf and a.requires_grad for a in alphas)
    net(torch.randn(1, 2, 16, 16, device=device)).square().mean().backward()
    assert all(a.grad is not None and a.grad.device.type == device for a in alphas)
    assert all(a.grad is not None for a in net.weight_parameters())


def test_alpha_state_round_trip_and_validation() -> None:
    den = build_search_denoiser(channels=C, num_cells=1)
    model = MoDL(den, num_unrolls=1, cg_iters=1)
    state = alpha_state(model)
    assert sorted(state) == ["node0", "node1", "node2"]
    assert all(v.dtype == np.float32 for v in state.values())
    new = {k: np.full_like(v, 0.5) for k, v in state.items()}
    before = arch_parameters(model)
    load_alpha_state(model, new)
    assert all(a is b for a, b in zip(before, arch_parameters(model)))  # copied in place
    np.testing.assert_array_equal(alpha_state(model)["node2"], new["node2"])
    with pytest.raises(ValueError, match="keys"):
        load_alpha_state(model, {"node0": new["node0"]})
    with pytest.raises(ValueError, match="shape"):
        load_alpha_state(model, {**new, "node1": np.zeros((2, 8))})
    with pytest.raises(ValueError, match="non-finite"):
        load_alpha_state(model, {**new, "node1": np.full((3, 8), np.nan)})


def test_two_search_nets_are_refused() -> None:
    model = MoDL([build_search_denoiser(C, 1) for _ in range(2)], num_unrolls=2, cg_iters=1)
    with pytest.raises(ValueError, match="shared"):
        alpha_state(model)


# ---------------------------------------------------------------- search on tiny synthetic data


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> SiteDataset:
    root = tmp_path_factory.mktemp("nas_sites")
    generate_sites(root, n_sites=1, n_slices=20, seed=0, matrix=32, overrides={"num_coils": 2})
    return SiteDataset(root / "site0", split="train")


def _search_model(num_cells: int = 1) -> MoDL:
    torch.manual_seed(0)
    return MoDL(build_search_denoiser(channels=C, num_cells=num_cells), num_unrolls=2, cg_iters=2)


def test_split_train_val_is_disjoint_and_seeded(site: SiteDataset) -> None:
    tr, va = split_train_val(site, 0.5, seed=3)
    assert len(tr) + len(va) == len(site) and len(tr) > 0 and len(va) > 0
    assert not set(tr.indices) & set(va.indices)
    assert split_train_val(site, 0.5, seed=3)[1].indices == va.indices
    assert tr[0] is site[tr.indices[0]]


def test_milenas_gradients_are_mixed_level(site: SiteDataset) -> None:
    """θ gets ∇θ L_tr only; α gets ∇α L_tr + λ ∇α L_val (FedAutoMRI Eq. 6)."""
    model = _search_model()
    loss_fn = get_loss("ssim")
    tr, va = collate([site[0]]), collate([site[1]])
    lam = 0.7
    milenas_grads(model, loss_fn, tr, va, lam)
    alphas, weights = arch_parameters(model), weight_parameters(model)
    got_a = [a.grad.clone() for a in alphas]  # type: ignore[union-attr]
    got_w = [w.grad.clone() for w in weights]  # type: ignore[union-attr]

    def grads(sample, params):  # type: ignore[no-untyped-def]
        from recon.physics.sense import SenseOp

        physics = SenseOp(sample.maps, sample.mask)
        loss = loss_fn(model(sample.kspace, physics), sample, physics)
        return torch.autograd.grad(loss, params)

    ref_w = grads(tr, weights)
    ref_a = [t + lam * v for t, v in zip(grads(tr, alphas), grads(va, alphas))]
    for g, r in zip(got_w, ref_w):
        torch.testing.assert_close(g, r)
    for g, r in zip(got_a, ref_a):
        torch.testing.assert_close(g, r)
    assert any(float(g.abs().max()) > 0 for g in got_a)


def test_search_moves_alpha_away_from_uniform(site: SiteDataset) -> None:
    model = _search_model()
    tr, va = split_train_val(site, 0.5, seed=0)
    theta0 = copy.deepcopy(model.state_dict())
    alpha0 = alpha_state(model)
    uniform = 1 / len(PRIMITIVES)
    spread0 = max(float(np.abs(_softmax(a) - uniform).max()) for a in alpha0.values())
    assert spread0 < 1e-3  # α starts at 1e-3 * N(0, 1): almost uniform

    t0 = time.perf_counter()
    result = milenas_train(model, tr, va, steps=30, lr_w=2e-3, lr_alpha=5e-2, lam=1.0, seed=0)
    print(f"30 MiLeNAS steps: {time.perf_counter() - t0:.1f} s")
    assert len(result.train_losses) == len(result.val_losses) == 30
    assert all(np.isfinite(result.train_losses + result.val_losses))

    alpha1 = alpha_state(model)
    spread1 = max(float(np.abs(_softmax(a) - uniform).max()) for a in alpha1.values())
    moved = max(float(np.abs(alpha1[k] - alpha0[k]).max()) for k in alpha0)
    # Observed on 2 CPU cores: moved 0.275, spread 0.033 (at lr-alpha 3e-2 on the realistic
    # synthetic sites 0.195 / 0.023, too close to the bounds below).
    print(f"alpha moved by {moved:.3f}; max |softmax - 1/8| {spread0:.1e} -> {spread1:.3f}")
    assert moved > 0.2 and spread1 > 0.02
    assert any(not torch.equal(theta0[k], v) for k, v in model.state_dict().items())
    # the learned α gives a valid genotype
    g = model_genotype(model)
    assert [len(n) for n in g.nodes] == [2, 2, 2] and g.channels == C and g.num_cells == 1


def test_empirical_risk_is_the_mean_slice_loss(site: SiteDataset) -> None:
    model = _search_model()
    subset = [site[0], site[1]]
    risk = empirical_risk(model, subset)
    assert model.training
    from recon.physics.sense import SenseOp

    with torch.no_grad():
        losses = []
        for s in subset:
            b = collate([s])
            physics = SenseOp(b.maps, b.mask)
            losses.append(float(get_loss("ssim")(model(b.kspace, physics), b, physics)))
    assert risk == pytest.approx(sum(losses) / 2, rel=1e-5)


def _softmax(a: np.ndarray) -> np.ndarray:
    z = np.exp(a - a.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


# ---------------------------------------------------------------- derivation and genotype files


def _alpha_with(choices: dict[tuple[int, int], int], strength: dict[tuple[int, int], float]):  # type: ignore[no-untyped-def]
    alpha = {f"node{i}": np.zeros((2 + i, 8), dtype=np.float32) for i in range(3)}
    for (i, j), op in choices.items():
        alpha[f"node{i}"][j, op] = strength[(i, j)]
    return alpha


def test_derive_keeps_the_top_two_edges_per_node_with_their_best_op() -> None:
    choices = {(0, 0): 5, (0, 1): 0, (1, 0): 2, (1, 1): 7, (1, 2): 6, (2, 0): 1, (2, 3): 3}
    strength = {(0, 0): 1.0, (0, 1): 2.0, (1, 0): 0.5, (1, 1): 3.0, (1, 2): 2.0}
    strength |= {(2, 0): 4.0, (2, 3): 1.0}
    g = derive_genotype(_alpha_with(choices, strength), k=2, channels=8, num_cells=2)
    assert g.nodes == (
        (("sep_conv_7x7", 0), ("std_conv_3x3", 1)),
        (("dil_3_conv_3x3", 1), ("dil_2_conv_3x3", 2)),  # edge 0 (0.5) is the weakest
        (("std_conv_5x5", 0), ("sep_conv_3x3", 3)),  # edges 1, 2 are uniform: dropped
    )
    assert (g.channels, g.num_cells) == (8, 2)
    with pytest.raises(ValueError, match="shape"):
        derive_genotype([np.zeros((3, 8))])


def test_genotype_file_round_trip_and_readable(tmp_path: Path) -> None:
    path = PUBLISHED.save(tmp_path / "genotype.json")
    data = json.loads(path.read_text())
    assert data["nodes"][2][1] == {"op": "std_conv_7x7", "input": 3}
    assert Genotype.load(path) == PUBLISHED
    assert Genotype.from_dict(PUBLISHED.to_dict()) == PUBLISHED
    den = build_nas_denoiser(path)  # the training phase alone, from a file
    assert count_parameters(den) == count_parameters(build_from_genotype(PUBLISHED))


def test_bad_genotype_files_name_the_field(tmp_path: Path) -> None:
    bad = PUBLISHED.to_dict()
    bad["nodes"][1][0]["op"] = "max_pool_3x3"
    with pytest.raises(ValueError, match=r"nodes\[1\]\[0\]\.op"):
        Genotype.from_dict(bad)
    bad = PUBLISHED.to_dict()
    bad["nodes"][0][0]["input"] = 2  # node 0 only sees the two cell inputs
    with pytest.raises(ValueError, match=r"nodes\[0\]\[0\]\.input"):
        Genotype.from_dict(bad)
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        Genotype.load(path)


def test_derived_network_shapes_and_parameter_count() -> None:
    torch.manual_seed(0)
    den = build_from_genotype(PUBLISHED, channels=C, num_cells=2)
    x = torch.randn(2, 32, 32, dtype=torch.complex64)
    out = den(x)
    assert out.shape == x.shape and out.dtype == torch.complex64
    # stem + head + per cell: two 1x1 preprocessing convs and the genotype's six operations
    cell = 2 * (C * C + C) + 3 * _sep_params(C, 5) + 2 * _sep_params(C, 3) + _std_params(C, 7)
    stem_head = (2 * C * 9 + C) + (C * 2 * 9 + 2)
    assert count_parameters(den) == stem_head + 2 * cell
    # GAutoMRI Table III: 0.0487M weights at C = 16 with 3 cells (+1 for MoDL's lam)
    assert count_parameters(build_from_genotype(PUBLISHED)) == 48_690
    model = MoDL(den, num_unrolls=2, cg_iters=2)
    assert not any("alpha" in k for k in model.state_dict())


def test_derived_net_matches_a_search_net_with_one_hot_alpha() -> None:
    """A search net whose α is (numerically) one-hot on the genotype = the derived net."""
    g = Genotype(((("std_conv_3x3", 0), ("sep_conv_3x3", 1)),), channels=C, num_cells=1)
    search = SearchDenoiser(C, num_cells=1, num_nodes=1)
    derived = DerivedNet(g.nodes, channels=C, num_cells=1)
    # copy the shared weights: stem, head, preprocessing and the two kept operations
    sd = search.state_dict()
    sd.update({k: v for k, v in derived.state_dict().items() if k.startswith(("stem", "head"))})
    for k, v in derived.state_dict().items():
        if k.startswith("cells.0.pre"):
            sd[k] = v
    for e, (name, j) in enumerate(g.nodes[0]):
        op = PRIMITIVES.index(name)
        for k, v in derived.cells[0].nodes[0].ops[e].state_dict().items():  # type: ignore[index]
            sd[f"cells.0.nodes.0.edges.{j}.ops.{op}.{k}"] = v
    search.load_state_dict(sd)
    logits = np.full((2, 8), -40.0, dtype=np.float32)
    logits[0, 0] = logits[1, 3] = 40.0
    search.load_alpha_state({"node0": logits})
    x = torch.randn(1, 2, 16, 16)
    torch.testing.assert_close(search(x), derived(x))


# ---------------------------------------------------------------- cost


def test_conv_macs_hand_computed() -> None:
    conv = nn.Conv2d(4, 6, 3, padding=1)
    assert count_conv_macs(conv, torch.zeros(1, 4, 10, 10)) == 6 * 10 * 10 * 4 * 9
    dw = nn.Conv2d(4, 4, 5, padding=2, groups=4)
    assert count_conv_macs(dw, torch.zeros(1, 4, 10, 10)) == 4 * 10 * 10 * 1 * 25
    up = nn.ConvTranspose2d(4, 2, 2, stride=2)
    assert count_conv_macs(up, torch.zeros(1, 4, 5, 5)) == 4 * 5 * 5 * 2 * 4


def test_published_genotype_cost_matches_seed_001() -> None:
    den = build_from_genotype(PUBLISHED)
    cost = denoiser_cost(den, 64)
    # MACs scale with H * W ("same" padding): 256^2 = 16 x 64^2. GAutoMRI Table IV lists
    # 15.7444 G for the searched model: the MACs of 5 denoiser calls on a 256 x 256 image.
    assert cost["macs"] * 16 * 5 == 15_744_368_640
    unet = unrolled_cost(MoDL(build_denoiser("unet"), num_unrolls=5, cg_iters=1), 64)
    ours = unrolled_cost(MoDL(den, num_unrolls=5, cg_iters=1), 64)
    assert ours["macs"] == 5 * cost["macs"] and ours["params"] == 48_691
    print(
        f"per 256^2 image, 5 unrolls: NAS {ours['params']} weights, {ours['macs'] * 16 / 1e9:.2f} "
        f"GMACs; U-Net {unet['params']} weights, {unet['macs'] * 16 / 1e9:.2f} GMACs"
    )


def test_one_federated_search_round_composes(site: SiteDataset) -> None:
    """Algorithm 1, one round, without Flower: θ and α each averaged with N_c / N (Eq. 8)."""
    from strategies.maths import fedavg
    from strategies.nas_maths import aggregate_alpha

    global_model = _search_model()
    parts = [Subset(site, range(0, 4)), Subset(site, range(4, len(site)))]
    thetas, alphas, counts = [], [], []
    for c, data in enumerate(parts):
        local = copy.deepcopy(global_model)
        tr, va = split_train_val(data, 0.5, seed=c)
        milenas_train(local, tr, va, steps=2, lr_alpha=0.1, seed=c)
        thetas.append({k: v.numpy() for k, v in local.state_dict().items()})
        alphas.append(alpha_state(local))
        counts.append(len(data))
    assert counts[0] != counts[1]
    theta = fedavg(thetas, counts)
    alpha = aggregate_alpha(alphas, counts)
    global_model.load_state_dict({k: torch.from_numpy(v) for k, v in theta.items()})
    load_alpha_state(global_model, alpha)
    w = np.array(counts) / sum(counts)
    for key in alpha:
        expected = w[0] * alphas[0][key] + w[1] * alphas[1][key]
        np.testing.assert_allclose(alpha_state(global_model)[key], expected, rtol=1e-5)
