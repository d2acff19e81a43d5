"""Run-time speed settings of local training: ``train.compile`` and ``train.precision``.

Both change how the denoiser CNN runs, never the weights or the checkpoint format (a compiled
module keeps its parameter names; autocast is a run-time setting):

* ``compile``: :func:`torch.compile` (inductor) of every denoiser CNN. The physics stays eager (its
  complex FFT operators and hand-written adjoints gain nothing from tracing). A compiled CNN is
  reused by every model of the same structure in the process, so it is paid once per process and
  image size: tens of seconds on a CPU, less once inductor's on-disk cache holds it. Evaluation
  runs it eagerly (:func:`recon.train.trainer.evaluate`). If compiling fails (no C++ compiler, an
  unsupported op), PyTorch logs why and runs that CNN eagerly.
* ``precision = "bf16"``: the CNN under ``torch.autocast`` in bfloat16; FFTs, CG and the loss stay
  float32 (:func:`recon.models.unrolled.set_denoiser_autocast`). Meant for GPUs.
"""

from __future__ import annotations

import torch
from torch import nn

from recon.models.denoisers import ComplexDenoiser
from recon.models.unrolled import set_denoiser_autocast

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def compile_denoisers(model: nn.Module) -> int:
    """Compile each denoiser CNN of ``model`` in place (static shapes); returns how many were
    newly compiled (an already compiled one is left as it is)."""
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True  # a CNN that fails to compile runs eagerly
    count = 0
    for module in model.modules():
        if isinstance(module, ComplexDenoiser):
            net = module.net
            if getattr(net, "_compiled_call_impl", None) is None:
                net.compile(dynamic=False)
                count += 1
    return count


def dp_refusal(compile: bool, precision: str) -> str | None:
    """Why DP-SGD refuses these settings (None if it does not): its per-slice gradients run the
    CNN eagerly in float32, so neither would hold."""
    if compile or precision != "fp32":
        return (
            'train.compile and train.precision = "bf16" do not combine with dp.enabled '
            "(DP-SGD's per-slice gradients run the CNN eagerly, in float32)"
        )
    return None


def prepare(model: nn.Module, compile: bool, precision: str) -> None:
    """Apply ``train.compile`` and ``train.precision`` to ``model`` (idempotent)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown train.precision {precision!r}; choose one of {list(PRECISIONS)}")
    set_denoiser_autocast(model, PRECISIONS[precision])
    if compile:
        compile_denoisers(model)
