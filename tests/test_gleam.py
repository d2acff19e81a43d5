"""GLEAM / P-GLEAM (GLEAM Alg. 1-2), checkpointing and the method dispatcher (32 px)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from recon.data.sample import Sample, collate
from recon.models import build_model
from recon.models.denoisers import build_denoiser
from recon.models.unrolled import MoDL, Unrolled
from recon.physics import SenseOp, fft2c
from recon.train import TrainConfig, TrainHooks, evaluate, train
from recon.train.checkpointing import CheckpointedUnrolled, train_checkpointed
from recon.train.gleam import split_modules, train_gleam
from recon.train.losses import get_loss
from recon.train.methods import METHODS, local_train


def tiny_samples(n: int, size: int = 32, coils: int = 2, seed: int = 0) -> list[Sample]:
    """Smooth complex images, smooth normalised coil maps, 1D random masks (R ~ 3)."""
    g = torch.Generator().manual_seed(seed)

    def smooth(*lead: int, low: int = 6) -> torch.Tensor:
        z = torch.randn(*lead, 2, low, low, generator=g)
        up = F.interpolate(z.view(-1, 2, low, low), size=(size, size), mode="bicubic")
        return torch.complex(up[:, 0], up[:, 1]).view(*lead, size, size)

    out = []
    for _ in range(n):
        x = smooth(1)[0] * (torch.rand(size, size, generator=g) > 0.3)  # texture + edges
        x = F.avg_pool2d(torch.view_as_real(x).permute(2, 0, 1)[None], 3, 1, 1)[0]
        x = torch.complex(x[0], x[1])
        maps = smooth(coils, low=3) + 1.5
        maps = maps / maps.abs().pow(2).sum(0, keepdim=True).sqrt()
        cols = torch.rand(size, generator=g) < 0.25
        cols[size // 2 - 2 : size // 2 + 2] = True
        mask = cols.float().expand(size, size).clone()
        kspace = mask * fft2c(maps * x)
        target = (maps * x).abs().pow(2).sum(0).sqrt()
        out.append(Sample(kspace, mask, maps, target, {"slice": len(out)}, image=x))
    return out


def tiny_modl(num_unrolls: int = 2, seed: int = 0, learn_lam: bool = True) -> MoDL:
    torch.manual_seed(seed)
    dens = [build_denoiser("resnet", features=4, num_layers=3) for _ in range(num_unrolls)]
    return MoDL(dens, num_unrolls=num_unrolls, cg_iters=2, lam_init=0.1, learn_lam=learn_lam)


def assert_same_params(a: nn.Module, b: nn.Module, atol: float = 1e-6) -> None:
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, atol=atol, rtol=0, msg=f"parameter {name} differs")


DATA = tiny_samples(4)
CFG = TrainConfig(lr=1e-3, steps=3, loss="l2")


def test_split_modules_and_shared_model_refused() -> None:
    assert split_modules(6, 3) == [range(0, 2), range(2, 4), range(4, 6)]
    with pytest.raises(ValueError, match="dividing"):
        split_modules(6, 4)
    shared = build_model(num_unrolls=2, cg_iters=2, denoiser="resnet", resnet_features=4)
    with pytest.raises(ValueError, match="shared=False"):
        train_gleam(shared, DATA, CFG, num_modules=2)


@pytest.mark.parametrize("num_unrolls,num_modules", [(2, 2), (4, 2)])
def test_gleam_trains_denoisers_and_freezes_lam(num_unrolls: int, num_modules: int) -> None:
    model = tiny_modl(num_unrolls)
    before = copy.deepcopy(model)
    res = train_gleam(model, DATA, CFG, num_modules=num_modules)
    assert res.steps == 3 and len(res.module_losses) == 3
    assert all(len(row) == num_modules for row in res.module_losses)
    assert res.losses == [row[-1] for row in res.module_losses]
    assert torch.equal(model.log_lam, before.log_lam)  # lam is frozen (documented choice)
    assert model.log_lam.requires_grad  # ... and given back trainable
    for d0, d1 in zip(before.denoisers, model.denoisers):
        assert any(not torch.equal(p, q) for p, q in zip(d0.parameters(), d1.parameters()))


def test_first_module_is_trained_on_its_own_local_loss() -> None:
    """Eq. 10 for m = 1: module 1 of GLEAM == the 1-unroll network trained end to end; module 2
    never changes module 1 (its input is detached)."""
    model = tiny_modl(2, learn_lam=False)
    alone = MoDL([copy.deepcopy(model.denoisers[0])], 1, cg_iters=2, lam_init=0.1, learn_lam=False)
    other = copy.deepcopy(model)
    torch.manual_seed(5)
    for p in other.denoisers[1].parameters():
        nn.init.normal_(p, std=0.1)
    train_gleam(model, DATA, CFG, num_modules=2)
    train_gleam(other, DATA, CFG, num_modules=2)
    train(alone, DATA, CFG)
    assert_same_params(model.denoisers[0], alone.denoisers[0])
    assert_same_params(model.denoisers[0], other.denoisers[0], atol=0)


def test_one_module_equals_end_to_end_with_fixed_lam() -> None:
    a = tiny_modl(2, learn_lam=False)
    b = copy.deepcopy(a)
    train_gleam(a, DATA, CFG, num_modules=1)
    train(b, DATA, CFG)
    assert_same_params(a, b)


@pytest.mark.parametrize("arch", ["modl", "pgd"])
def test_pgleam_on_two_devices_equals_gleam(arch: str) -> None:
    """Alg. 2 (forwards of a block first, then backwards) gives Alg. 1's updates."""
    if arch == "modl":
        model: Unrolled = tiny_modl(4)
    else:
        torch.manual_seed(0)
        model = build_model(arch="pgd", num_unrolls=4, denoiser="resnet", resnet_features=4)
    twin = copy.deepcopy(model)
    cfg = TrainConfig(lr=1e-3, steps=3, loss="ssim")
    a = train_gleam(model, DATA, cfg)
    b = train_gleam(twin, DATA, cfg, devices=["cpu", "cpu"])
    assert_same_params(model, twin)
    torch.testing.assert_close(torch.tensor(a.module_losses), torch.tensor(b.module_losses))


def test_pgleam_on_cuda_and_cpu_matches_cpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny_modl(2)
    twin = copy.deepcopy(model)
    train_gleam(model, DATA, CFG)
    train_gleam(twin, DATA, CFG, devices=["cuda", "cpu"], device="cpu")
    assert_same_params(model, twin, atol=1e-4)


def test_pgleam_on_two_gpus_matches_one_gpu() -> None:
    """Alg. 2 on real GPUs: modules alternate between cuda:0 and cuda:1."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    model = tiny_modl(4)
    twin = copy.deepcopy(model)
    train_gleam(model, DATA, CFG, device="cuda:0")
    train_gleam(twin, DATA, CFG, devices=["cuda:0", "cuda:1"], device="cuda:0")
    assert_same_params(model.cpu(), twin.cpu(), atol=1e-5)


def test_hooks_see_one_module_at_a_time() -> None:
    """FedProx's term is added to each module's loss; Scaffold's correction edits that module's
    gradients only (the other modules' .grad are None when the hook runs)."""
    model = tiny_modl(4)
    module_ids = [
        {id(p) for i in (0, 1) for p in model.denoisers[i].parameters()},
        {id(p) for i in (2, 3) for p in model.denoisers[i].parameters()},
    ]
    anchor = [p.detach().clone() for p in model.parameters()]
    seen: list[set[int]] = []
    calls = {"reg": 0}

    def prox(m: nn.Module) -> torch.Tensor:
        calls["reg"] += 1
        return 0.5 * sum(((p - a) ** 2).sum() for p, a in zip(m.parameters(), anchor))

    def correct(m: nn.Module) -> None:
        seen.append({id(p) for p in m.parameters() if p.grad is not None})
        for p in m.parameters():
            if p.grad is not None:
                p.grad.add_(0.01)

    hooks = TrainHooks(regularizer=prox, after_backward=correct)
    train_gleam(model, DATA, CFG, hooks=hooks, num_modules=2)
    assert calls["reg"] == 3 * 2
    assert seen == module_ids * 3


def test_gleam_per_module_lr_and_loss() -> None:
    model = tiny_modl(2)
    before = copy.deepcopy(model)
    res = train_gleam(model, DATA, CFG, lrs=[1e-3, 0.0], losses=["l2", "ssim"])
    assert_same_params(model.denoisers[1], before.denoisers[1], atol=0)  # lr 0: unchanged
    assert 0 < res.module_losses[0][1] < 1  # an SSIM loss, not an L2 value
    with pytest.raises(ValueError, match="3 entries for 2 modules"):
        train_gleam(model, DATA, CFG, lrs=[1e-3] * 3)


def test_gleam_early_exit_curve_is_monotone() -> None:
    """GLEAM Fig. 9: every GLEAM prefix is trained to fit the reference, so PSNR rises with
    N_inf. Seen (60 steps, N = 3): zero-filled 20.07, then 21.42, 21.57, 21.89 dB; end to end
    from the same init gives 20.66, 20.90, 22.13 and, with init seed 1, 20.62, 18.94, 21.80 (not
    monotone, as in Fig. 9)."""
    train_set, test_set = tiny_samples(6, seed=1), tiny_samples(3, seed=2)
    model = tiny_modl(3)
    train_gleam(model, train_set, TrainConfig(lr=3e-3, steps=60, loss="l2"))
    out = evaluate(model, test_set, per_unroll=True)
    curve = out["psnr_per_unroll"]
    assert isinstance(curve, list) and len(curve) == 3
    zero_filled = evaluate(model, test_set, num_unrolls=0)["psnr"]
    full = [zero_filled] + curve
    assert all(b >= a - 0.05 for a, b in zip(full, full[1:])), full
    assert curve[-1] == pytest.approx(max(curve), abs=0.05)
    early = evaluate(model, test_set, num_unrolls=2)["psnr"]
    assert early == pytest.approx(curve[1], abs=1e-4)


def test_checkpointed_gradients_equal_end_to_end() -> None:
    model = tiny_modl(3)
    wrapped = CheckpointedUnrolled(model)
    s = collate(DATA[:2])
    op = SenseOp(s.maps, s.mask)
    loss_fn = get_loss("ssim")
    loss_fn(model(s.kspace, op), s, op).backward()  # type: ignore[arg-type]
    ref = [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]
    model.zero_grad()
    out = wrapped(s.kspace, op)
    loss_fn(out, s, op).backward()  # type: ignore[arg-type]
    for g, p in zip(ref, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    assert set(wrapped.state_dict()) == {f"inner.{k}" for k in model.state_dict()}


def test_checkpointed_training_equals_end_to_end() -> None:
    a = tiny_modl(2)
    b = copy.deepcopy(a)
    train(a, DATA, CFG)
    names: list[str] = []
    hooks = TrainHooks(after_backward=lambda m: names.extend(n for n, _ in m.named_parameters()))
    train_checkpointed(b, DATA, CFG, hooks=hooks)
    assert_same_params(a, b)
    assert names[: len(list(a.parameters()))] == [n for n, _ in a.named_parameters()]


@pytest.mark.parametrize("method", METHODS)
def test_local_train_dispatches_every_method_with_hooks(method: str) -> None:
    if method == "layerwise":
        from recon.models.convex import build_convex_denoiser

        torch.manual_seed(0)
        dens = [build_convex_denoiser(num_blocks=2, hidden=4, kernel_size=3) for _ in range(2)]
        model: Unrolled = MoDL(dens, num_unrolls=2, cg_iters=2)
    else:
        model = tiny_modl(2)
    calls = {"reg": 0, "after": 0}

    def reg(m: nn.Module) -> torch.Tensor:
        calls["reg"] += 1
        return 1e-3 * sum((p**2).sum() for p in m.parameters())

    def after(m: nn.Module) -> None:
        calls["after"] += 1

    before = copy.deepcopy(model.state_dict())
    res = local_train(method, model, DATA, CFG, hooks=TrainHooks(reg, after), progress=False)
    assert res.losses and all(torch.isfinite(torch.tensor(res.losses)))
    assert calls["reg"] == calls["after"] > 0
    assert set(model.state_dict()) == set(before)
    assert any(not torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_local_train_rejects_unknown_method_and_options() -> None:
    with pytest.raises(ValueError, match="unknown training method 'sgd'"):
        local_train("sgd", tiny_modl(2), DATA, CFG)
    with pytest.raises(TypeError, match="num_blocks"):
        local_train("gleam", tiny_modl(2), DATA, CFG, num_blocks=2)
    with pytest.raises(TypeError, match="'e2e' got unknown options"):
        local_train("e2e", tiny_modl(2), DATA, CFG, num_modules=2)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_stops_when_after_step_says_so(method: str) -> None:
    """Early stopping (personalization's cross-validation) works whatever the trainer."""
    if method == "layerwise":
        torch.manual_seed(0)
        model: Unrolled = build_model(
            denoiser="convex", num_unrolls=2, shared=False, convex_blocks=2, convex_hidden=4
        )
    else:
        model = tiny_modl(2)
    calls: list[int] = []

    def stop_after_two(step: int) -> bool:
        calls.append(step)
        return step >= 2

    res = local_train(
        method,
        model,
        DATA,
        CFG.model_copy(update={"steps": 6}),
        hooks=TrainHooks(after_step=stop_after_two),
    )
    assert calls == [1, 2]
    assert res.steps == 2 and len(res.losses) == 2


@pytest.mark.parametrize("method", ["e2e", "checkpoint", "gleam"])
def test_non_finite_loss_is_refused_naming_where(method: str) -> None:
    """A NaN in a slice's k-space stops training with an error naming the step and slice (and
    the module under GLEAM), before any weight is changed."""
    bad = copy.deepcopy(DATA[0])
    bad.kspace[0, 0, 0] = float("nan")
    model = tiny_modl(2)
    before = copy.deepcopy(model)
    with pytest.raises(FloatingPointError, match="non-finite training loss") as err:
        local_train(method, model, [bad], CFG)
    assert "'slice': 0" in str(err.value) and "step 0" in str(err.value)
    if method == "gleam":
        assert "GLEAM module 0" in str(err.value)
    assert_same_params(model, before, atol=0)
