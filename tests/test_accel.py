"""``train.compile`` and ``train.precision`` (recon.train.accel): how the denoiser CNN runs, never
what the weights mean."""

from __future__ import annotations

import pytest
import torch
from test_gleam import tiny_samples

from recon.config import parse_run_config
from recon.models import build_model
from recon.train import TrainConfig, evaluate, train
from recon.train.methods import local_train

DATA = tiny_samples(3)


def small_unet_modl() -> torch.nn.Module:
    # one pooling level and 4 channels: the smallest U-Net graph, so compiling stays short
    torch.manual_seed(0)
    return build_model(num_unrolls=2, cg_iters=2, unet_chans=4, unet_pools=1)


def losses(compile: bool, precision: str = "fp32", method: str = "e2e") -> tuple[list[float], dict]:
    model = small_unet_modl()
    cfg = TrainConfig(steps=3, compile=compile, precision=precision)
    result = local_train(method, model, DATA, cfg, progress=False)
    return result.losses, model.state_dict()


@pytest.fixture
def fresh_dynamo():
    """Each test compiles from scratch: dynamo reuses compiled code across models in a process."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_training_matches_eager_and_keeps_the_checkpoint_format(fresh_dynamo) -> None:
    eager_losses, eager_state = losses(compile=False)
    model = small_unet_modl()
    result = train(model, DATA, TrainConfig(steps=3, compile=True), progress=False)
    nets = [d.net for d in model.modules() if type(d).__name__ == "ComplexDenoiser"]
    assert nets and all(n._compiled_call_impl is not None for n in nets)
    torch.testing.assert_close(result.losses, eager_losses, rtol=1e-4, atol=1e-5)
    state = model.state_dict()
    assert list(state) == list(eager_state)  # no "_orig_mod." prefixes: checkpoints load anywhere
    for k, v in eager_state.items():
        torch.testing.assert_close(state[k], v, rtol=1e-3, atol=1e-5, msg=k)
    fresh = small_unet_modl()  # an eager model takes the compiled one's weights unchanged
    fresh.load_state_dict(state)
    from torch._dynamo.utils import counters

    compiled_frames = counters["frames"]["ok"]
    assert evaluate(model, DATA).psnr == pytest.approx(evaluate(fresh, DATA).psnr, abs=1e-3)
    assert counters["frames"]["ok"] == compiled_frames  # evaluation compiled no second graph


@pytest.mark.slow
def test_a_failed_compile_trains_eagerly(fresh_dynamo, monkeypatch, caplog) -> None:
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(inductor, "fx_graph_cache", False)  # no cached kernel may hide it
    eager_losses, _ = losses(compile=False)
    with caplog.at_level("WARNING"):
        compiled_losses, _ = losses(compile=True)
    assert any("C++ compiler" in r.getMessage() for r in caplog.records)  # PyTorch said why
    assert compiled_losses == eager_losses  # it ran eagerly: bitwise the eager result


def test_bf16_precision_runs_the_cnn_in_bf16_only() -> None:
    fp32, _ = losses(compile=False)
    bf16, state = losses(compile=False, precision="bf16")
    assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())  # weights fp32
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=0.05)  # bf16 rounding, same course
    model = small_unet_modl()
    train(model, DATA, TrainConfig(steps=1, precision="bf16"), progress=False)
    assert model.denoiser_autocast is torch.bfloat16
    train(model, DATA, TrainConfig(steps=1), progress=False)  # fp32 again: a run-time setting
    assert model.denoiser_autocast is None


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"train.precision": "fp16"}, "train.precision"),
        ({"dp.enabled": True, "strategy.name": "fedavg", "train.compile": True}, "train.compile"),
        ({"dp.enabled": True, "strategy.name": "fedavg", "train.precision": "bf16"}, "bf16"),
    ],
)
def test_config_refuses_what_it_cannot_honour(overrides: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_run_config(overrides)


def test_config_carries_the_keys() -> None:
    cfg = parse_run_config({"train.compile": True, "train.precision": "bf16"})
    assert cfg.train.compile is True and cfg.train.precision == "bf16"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_training_in_bf16_from_pinned_samples_follows_the_cpu_course() -> None:
    sample = DATA[0].to("cuda")
    assert sample.kspace.is_cuda and torch.equal(sample.kspace.cpu(), DATA[0].kspace)
    cpu, _ = losses(compile=False)
    model = small_unet_modl()
    cfg = TrainConfig(steps=3, precision="bf16")
    gpu = local_train("e2e", model, DATA, cfg, device="cuda", progress=False).losses
    assert gpu == pytest.approx(cpu, rel=0.05)


@pytest.mark.parametrize(("compile", "precision"), [(True, "fp32"), (False, "bf16")])
def test_dp_training_through_the_python_api_refuses_them_too(compile: bool, precision: str) -> None:
    from recon.train.privacy import DPSGD

    dp = DPSGD(clip=1.0, noise_multiplier=1.0, sample_rate=0.5, noise_seed=0)
    cfg = TrainConfig(steps=1, compile=compile, precision=precision)
    model = small_unet_modl()
    with pytest.raises(ValueError, match="do not combine with dp.enabled"):
        local_train("e2e", model, DATA, cfg, progress=False, dp=dp)
    assert model.denoiser_autocast is None  # refused before anything was applied
