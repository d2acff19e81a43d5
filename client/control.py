"""Scaffold at a site: the gradient correction, the new control variate c_k, and where c_k lives.

:class:`ScaffoldRound` is one round of Levac et al. 2023 Algorithm 1 at a site: every local
gradient g becomes ``g - c_k + c`` (line 6), then c_k^+ and Delta c_k (line 7, option (i) or
(ii)). c_k is kept in ``context.state`` and on the site's disk.

``context.state`` lives as long as the Flower run on this node; the disk copy lets a killed run
resume (a new Flower run with an empty state) to the same result. Files are tagged with the
round they were produced in and with the run's uid, so a resumed round ``r`` reads the c_k of
the round before ``r`` even if a crash happened after some sites had already saved round ``r``::

    <state path>/.fedunroll/<run uid>/scaffold_c.r000003.npz     (written atomically)

The state path is the site's ``state-path`` node config, by default its data path
(:class:`client.site.Site`), so a hospital can mount its data read-only and keep state elsewhere.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict

from client.state import RoundFiles
from recon.data.sample import Slices, collate
from recon.train import get_loss
from strategies import maths
from strategies.protocol import get_int, to_numpy, to_record

STATE_ARRAYS = "scaffold.c-local"
STATE_META = "scaffold.c-local-meta"


def _files(state_path: Path, run_uid: str) -> RoundFiles:
    return RoundFiles(state_path, run_uid, "scaffold_c")


def load_control(
    state: RecordDict,
    state_path: Path,
    run_uid: str,
    server_round: int,
    reference: Mapping[str, np.ndarray],
) -> tuple[dict[str, np.ndarray], int]:
    """c_k as it was before ``server_round``: from the state, else the site's disk, else zeros.

    Returns
    -------
    (c_k, round)
        The arrays (keys and dtypes of ``reference``, i.e. of c) and the round that produced
        them (0 for the zero initialisation, Levac et al. 2023 Alg. 1 ``c_k^0``).
    """
    meta = state.config_records.get(STATE_META)
    if (
        meta is not None
        and meta.get("run-uid") == run_uid
        and get_int(meta, "round", 0) < server_round
        and STATE_ARRAYS in state.array_records
    ):
        arrays = to_numpy(state.array_records[STATE_ARRAYS])
        if _matches(arrays, reference):
            return arrays, get_int(meta, "round")
    files = _files(state_path, run_uid)
    latest = files.latest_before(server_round)
    if latest is not None:
        path = files.path(latest)
        try:
            with np.load(path) as z:
                arrays = {k: z[k] for k in z.files}
            if _matches(arrays, reference):
                return arrays, latest
            warnings.warn(
                f"{path}: control variate does not match the model; reset to 0", stacklevel=2
            )
        except (OSError, ValueError) as err:
            warnings.warn(f"{path}: unreadable control variate ({err}); reset to 0", stacklevel=2)
    return {k: np.zeros_like(v) for k, v in reference.items()}, 0


def forget_run(state: RecordDict, state_path: Path, run_uid: str) -> None:
    """Delete a finished run's c_k (state and disk). A run extended later restarts c_k at 0."""
    state.array_records.pop(STATE_ARRAYS, None)
    state.config_records.pop(STATE_META, None)
    _files(state_path, run_uid).forget()


def _matches(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> bool:
    return list(arrays) == list(reference) and all(
        arrays[k].shape == v.shape and arrays[k].dtype == v.dtype for k, v in reference.items()
    )


def save_control(
    state: RecordDict,
    state_path: Path,
    run_uid: str,
    server_round: int,
    c_new: Mapping[str, np.ndarray],
    loaded_round: int,
) -> Path | None:
    """Keep c_k^+ of ``server_round`` in the state and atomically on disk.

    Older files than ``loaded_round`` are removed (the one just read stays, so a resumed
    ``server_round`` still finds it). A read-only state path only warns: the state copy is
    enough for an uninterrupted run.
    """
    state.array_records[STATE_ARRAYS] = to_record(c_new)
    state.config_records[STATE_META] = ConfigRecord({"run-uid": run_uid, "round": server_round})
    files = _files(state_path, run_uid)
    try:
        return files.save(server_round, c_new, keep_from=loaded_round)
    except OSError as err:
        target = files.path(server_round)
        warnings.warn(f"cannot save the Scaffold control variate to {target}: {err}", stacklevel=2)
        return None


def gradient_at(
    model: torch.nn.Module,
    data: Slices,
    loss: str,
    num_slices: int,
    reference: Mapping[str, np.ndarray],
    device: str,
) -> dict[str, np.ndarray]:
    """g_k(x): the mean ``loss`` gradient over the first ``num_slices`` slices at x (option (i)).

    Keyed like ``reference`` (c); arrays without a gradient (buffers) get zeros.
    """
    loss_fn = get_loss(loss)
    params = dict(model.named_parameters())
    model.zero_grad(set_to_none=True)
    n = min(num_slices, len(data))
    for i in range(n):
        sample = collate([data[i]]).to(device)
        physics = sample.physics()
        image = model(sample.kspace, physics)
        assert isinstance(image, torch.Tensor)  # the final unroll only
        (loss_fn(image, sample, physics) / n).backward()
    out = {}
    for k, ref in reference.items():
        grad = params[k].grad if k in params else None
        out[k] = np.zeros_like(ref) if grad is None else grad.detach().cpu().numpy()
    model.zero_grad(set_to_none=True)
    return out


class ScaffoldRound:
    """One round of Scaffold at a site (Levac et al. 2023 Alg. 1 lines 6-7).

    Parameters
    ----------
    model : torch.nn.Module
        The model at the received x, before local training.
    option : str
        ``"i"`` or ``"ii"`` (``scaffold.option``): how c_k^+ is computed.
    c_global, c_local : mapping name -> array
        c (from the message) and this site's c_k (from :func:`load_control`).
    grad_at_global : mapping, optional
        g_k(x) (:func:`gradient_at`); needed by option (i).
    loaded_round : int
        The round that produced ``c_local`` (:func:`save_control` keeps its file).

    :meth:`after_backward` is the training hook: it turns the gradient of every parameter that
    has one in this backward pass into ``g - c_k + c`` (:func:`strategies.maths.
    scaffold_correction`). GLEAM and layer-wise training call it once per module / block with
    the other ``.grad`` left ``None``, and frozen parameters (GLEAM's data-consistency weights)
    never have one: those are not corrected. It also sums the corrected gradients and counts,
    per parameter, the backward passes it took part in; :meth:`control_update` needs both.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        option: str,
        c_global: Mapping[str, np.ndarray],
        c_local: Mapping[str, np.ndarray],
        grad_at_global: Mapping[str, np.ndarray] | None = None,
        loaded_round: int = 0,
    ) -> None:
        params = dict(model.named_parameters())
        device = next(model.parameters()).device
        self.option = option
        self.c_global = dict(c_global)
        self.c_local = dict(c_local)
        self.grad_at_global = grad_at_global
        self.loaded_round = loaded_round
        self._params = {k: params[k] for k in c_global if k in params}
        self._c = {k: torch.as_tensor(np.asarray(c_global[k])).to(device) for k in self._params}
        self._c_k = {k: torch.as_tensor(np.asarray(c_local[k])).to(device) for k in self._params}
        self.grad_sum = {k: torch.zeros_like(p) for k, p in self._params.items()}
        self.counts = dict.fromkeys(self._params, 0)

    def after_backward(self, _: torch.nn.Module) -> None:
        """Correct this backward pass's gradients in place (a :class:`recon.train.TrainHooks`
        hook)."""
        grads = {k: p.grad for k, p in self._params.items() if p.grad is not None}
        corrected = maths.scaffold_correction(
            grads,
            {k: self._c[k].to(g.device) for k, g in grads.items()},
            {k: self._c_k[k].to(g.device) for k, g in grads.items()},
        )
        for k, g in corrected.items():
            grads[k].copy_(g)
            self.grad_sum[k].add_(g.to(self.grad_sum[k].device))
            self.counts[k] += 1

    def control_update(
        self, x: Mapping[str, np.ndarray], local_steps: int, lr: float
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(c_k^+, Delta c_k) after ``local_steps`` steps of step size ``lr`` from ``x``."""
        # Alg. 1 line 7 (ii) is c_k - c + (x - y_k) / (K eta_l). With plain SGD,
        # (x - y_k) / (K eta_l) is exactly the mean corrected gradient; with Adam (the paper's
        # local optimiser) the displacement is rescaled per coordinate, so we pass the
        # displacement SGD would have made: y_sgd = x - eta_l * sum of corrected gradients.
        # GLEAM / layer-wise train each parameter in only n_k of the K steps (a layer-wise
        # block for K / blocks steps): the sum is scaled by K / n_k, so the mean is over the
        # steps the parameter was trained in and c_k^+ is the mean of its own gradients.
        counts = self.counts
        y_sgd = {
            k: np.asarray(x[k] - lr * (local_steps / counts[k]) * g.cpu().numpy())
            for k, g in self.grad_sum.items()
            if counts[k]
        }
        c_new, c_delta = maths.scaffold_client_control_update(
            self.option,
            c_local=self.c_local,
            c_global=self.c_global,
            x_global=x,
            y_local={**x, **y_sgd},
            local_steps=local_steps,
            lr=lr,
            grad_at_global=self.grad_at_global,
        )
        # A parameter that got no gradient in any step (frozen by the method, e.g. GLEAM's
        # data-consistency weights) was not corrected and says nothing about this site's
        # drift: its c_k stays as it was and Delta c_k = 0, for both options (option (ii) would
        # otherwise give c_k - c, and option (i) a gradient of a parameter that never moves).
        for k in c_new:
            if counts.get(k, 0) == 0:
                c_new[k] = np.array(self.c_local[k], copy=True)
                c_delta[k] = np.zeros_like(c_delta[k])
        return c_new, c_delta
