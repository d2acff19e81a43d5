"""Scaffold at a site: the gradient correction, the new control variate c_k, and where c_k lives.

:class:`ScaffoldRound` is one round of Levac et al. 2023 Algorithm 1 at a site: every local
gradient g becomes ``g - c_k + c`` (line 6), then c_k^+ and Delta c_k (line 7, option (i) or
(ii)).

The invariant, and why c_k^+ is only *pending*
----------------------------------------------
Scaffold (Karimireddy et al. 2020 Alg. 1; Levac et al. 2023 Alg. 1) keeps::

    c = (1/N) sum_k c_k        over the *committed* c_k of the N sites

The server adds (1/N) Delta c_k to c only for the replies it accepts; so a site may make c_k^+
its c_k only once the server has accepted the reply that carried Delta c_k = c_k^+ - c_k. A
reply the server rejects or never receives (a timeout, a lost connection, a server that crashed
before checkpointing the round) must leave c_k as it was, or c drifts away from the mean of the
c_k for good and the federation converges to the wrong point.

The acknowledgement (:data:`strategies.protocol.SCAFFOLD_TOKEN`, ``SCAFFOLD_ACCEPTED``):

1. each c_k^+ gets a random token; the site keeps it as *pending* (``context.state`` and its
   round-tagged file) and sends the token with Delta c_k (reply config ``scaffold.token``);
2. the server keeps, per site, the token of the last reply it aggregated (part of the strategy
   state, so it is checkpointed with c) and sends the tokens of every site in each train
   message (``scaffold.accepted``: random tokens, no site names, the same for every node);
3. at its next train message (:func:`resolve_control`) the site uses the newest c_k it holds
   whose token is in that list: its pending c_k^+ if that reply was accepted, else the c_k it
   had before; c_k^0 = 0 if none is. The other files are removed.

A train message is sent after the server's checkpoint of the round before, so the list says what
the server's durable c contains: the site follows the server through its resumes (a node id that
changed with a new Flower run does not matter: only tokens are compared). The site also keeps the
file its committed c_k was computed from, so a server that falls back to its previous checkpoint
(:func:`server.checkpoint.load`) still finds the c_k of that checkpoint. A site that never commits
(or a foreign one that ignores the list) only hurts itself: its corrections use a stale c_k, c
stays the mean of what the server accepted. A message without ``scaffold.accepted`` (a server
that does not acknowledge) makes the site commit c_k^+ at once (:func:`save_control`).

Where c_k lives
---------------
``context.state`` lives as long as the Flower run on this node; the disk copy lets a killed run
resume (a new Flower run with an empty state) to the same result. Files are tagged with the
round they were produced in and with the run's uid; each holds the arrays, the token and the
round of the c_k it was computed from::

    <state path>/.fedunroll/<run uid>/scaffold_c.r000003.npz     (written atomically)

The state path is the site's ``state-path`` node config, by default its data path
(:class:`client.site.Site`), so a hospital can mount its data read-only and keep state elsewhere.
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord, RecordDict

from client.state import RoundFiles
from recon.data.sample import Slices, collate
from recon.train import get_loss
from strategies import maths
from strategies.protocol import SCAFFOLD_ACCEPTED, get_int, get_str, to_numpy, to_record

# context.state records: the committed c_k and the pending c_k^+ (arrays and meta)
STATE_ARRAYS = "scaffold.c-local"
STATE_META = "scaffold.c-local-meta"
PENDING_ARRAYS = "scaffold.c-pending"
PENDING_META = "scaffold.c-pending-meta"
# entries of a c_k file besides the arrays (no model parameter has such a name)
_FILE_TOKEN = "__scaffold_token__"
_FILE_PARENT = "__scaffold_parent__"


@dataclass(frozen=True)
class Control:
    """One c_k a site holds.

    ``round`` produced it (0: c_k^0 = 0); ``token`` went with its Delta c_k ("" for c_k^0 and
    for a c_k committed without acknowledgement); ``parent`` is the round of the c_k it was
    computed from.
    """

    arrays: dict[str, np.ndarray]
    round: int
    token: str = ""
    parent: int = 0


def _files(state_path: Path, run_uid: str) -> RoundFiles:
    return RoundFiles(state_path, run_uid, "scaffold_c")


def accepted_tokens(config: Mapping[str, object]) -> frozenset[str] | None:
    """``scaffold.accepted`` of a train config: the tokens of the replies the server has
    aggregated, one per site; None if the server sent none (no acknowledgement)."""
    value = config.get(SCAFFOLD_ACCEPTED)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ValueError(f"{SCAFFOLD_ACCEPTED!r}: expected a list of tokens, got {value!r}")
    return frozenset(value)


def _zeros(reference: Mapping[str, np.ndarray]) -> Control:
    return Control({k: np.zeros_like(v) for k, v in reference.items()}, 0)


def _from_state(
    state: RecordDict, arrays_key: str, meta_key: str, run_uid: str, reference: Mapping
) -> Control | None:
    meta = state.config_records.get(meta_key)
    if meta is None or meta.get("run-uid") != run_uid or arrays_key not in state.array_records:
        return None
    arrays = to_numpy(state.array_records[arrays_key])
    if not _matches(arrays, reference):
        return None
    token = get_str(meta, "token", "")
    return Control(arrays, get_int(meta, "round", 0), token, get_int(meta, "parent", 0))


def _to_state(state: RecordDict, arrays_key: str, meta_key: str, run_uid: str, c: Control) -> None:
    state.array_records[arrays_key] = to_record(c.arrays)
    state.config_records[meta_key] = ConfigRecord(
        {"run-uid": run_uid, "round": c.round, "token": c.token, "parent": c.parent}
    )


def _drop_pending(state: RecordDict) -> None:
    state.array_records.pop(PENDING_ARRAYS, None)
    state.config_records.pop(PENDING_META, None)


def _read_file(files: RoundFiles, server_round: int, reference: Mapping) -> Control | None:
    """The c_k file of ``server_round``, or None (with a warning) if unusable."""
    path = files.path(server_round)
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as err:
        warnings.warn(f"{path}: unreadable control variate ({err}); ignored", stacklevel=3)
        return None
    token = str(arrays.pop(_FILE_TOKEN, ""))
    parent = int(arrays.pop(_FILE_PARENT, 0))
    if not _matches(arrays, reference):
        warnings.warn(f"{path}: control variate does not match the model; ignored", stacklevel=3)
        return None
    return Control(arrays, server_round, token, parent)


def _read_token(files: RoundFiles, server_round: int) -> str:
    try:
        with np.load(files.path(server_round)) as z:
            return str(z[_FILE_TOKEN]) if _FILE_TOKEN in z.files else ""
    except (OSError, ValueError):
        return ""


def _write_file(files: RoundFiles, c: Control, keep_from: int) -> Path | None:
    """Save ``c`` atomically (a read-only state path only warns: the state copy is enough for an
    uninterrupted run)."""
    extra = {_FILE_TOKEN: np.array(c.token), _FILE_PARENT: np.array(c.parent, np.int64)}
    try:
        return files.save(c.round, {**c.arrays, **extra}, keep_from=keep_from)
    except OSError as err:
        target = files.path(c.round)
        warnings.warn(f"cannot save the Scaffold control variate to {target}: {err}", stacklevel=3)
        return None


def committed_control(
    state: RecordDict,
    state_path: Path,
    run_uid: str,
    reference: Mapping[str, np.ndarray],
    accepted: Collection[str],
) -> Control:
    """The c_k the server's c counts for this site, given the tokens the server has accepted
    (``scaffold.accepted``); reads only.

    The newest c_k the site holds (pending or committed, in ``context.state`` or on disk) whose
    token is in ``accepted``; c_k^0 = 0 if none is.
    """
    held = [
        c
        for c in (
            _from_state(state, PENDING_ARRAYS, PENDING_META, run_uid, reference),
            _from_state(state, STATE_ARRAYS, STATE_META, run_uid, reference),
        )
        if c is not None
    ]
    named = [c for c in held if c.token and c.token in accepted]
    found = max(named, key=lambda c: c.round, default=None)
    if found is None:  # a new Flower run (resume) or a node restarted: the site's files
        files = _files(state_path, run_uid)
        for r in reversed(files.rounds()):
            if (token := _read_token(files, r)) and token in accepted:
                found = _read_file(files, r, reference)
                if found is not None:
                    break
    return _zeros(reference) if found is None else found


def resolve_control(
    state: RecordDict,
    state_path: Path,
    run_uid: str,
    reference: Mapping[str, np.ndarray],
    accepted: Collection[str],
) -> Control:
    """Commit (or discard) the pending c_k^+ as the server's ``accepted`` tokens say.

    :func:`committed_control` becomes the committed c_k (state); the pending one is dropped; on
    disk only its file and its parent's stay (a server resumed from its previous checkpoint
    accepted the parent, not it). Nothing is written to disk.
    """
    chosen = committed_control(state, state_path, run_uid, reference, accepted)
    _to_state(state, STATE_ARRAYS, STATE_META, run_uid, chosen)
    _drop_pending(state)
    files = _files(state_path, run_uid)
    try:
        files.keep_only({chosen.round, chosen.parent} if chosen.round else set())
    except OSError as err:
        warnings.warn(f"cannot remove old control variates in {files.folder}: {err}", stacklevel=2)
    return chosen


def keep_pending(
    state: RecordDict,
    state_path: Path,
    run_uid: str,
    server_round: int,
    c_new: Mapping[str, np.ndarray],
    parent_round: int,
) -> str:
    """Keep c_k^+ of ``server_round`` as pending (state and disk) until the server accepts the
    reply; returns its token, for the reply (``scaffold.token``)."""
    c = Control(dict(c_new), server_round, secrets.token_hex(16), parent_round)
    _to_state(state, PENDING_ARRAYS, PENDING_META, run_uid, c)
    _write_file(_files(state_path, run_uid), c, keep_from=0)
    return c.token


def load_control(
    state: RecordDict,
    state_path: Path,
    run_uid: str,
    server_round: int,
    reference: Mapping[str, np.ndarray],
    accepted: Collection[str] | None = None,
) -> tuple[dict[str, np.ndarray], int]:
    """c_k as it was before ``server_round``: its arrays and the round that produced it (0 for
    the zero initialisation, Levac et al. 2023 Alg. 1 ``c_k^0``).

    With ``accepted`` (the server's ``scaffold.accepted``): :func:`resolve_control`. Without
    (a server that does not acknowledge), the last c_k saved before ``server_round``: from the
    state, else the site's disk, else zeros (arrays keyed and typed like ``reference``, i.e. c).
    """
    if accepted is not None:
        c = resolve_control(state, state_path, run_uid, reference, accepted)
        return c.arrays, c.round
    held = _from_state(state, STATE_ARRAYS, STATE_META, run_uid, reference)
    if held is not None and held.round < server_round:
        return held.arrays, held.round
    files = _files(state_path, run_uid)
    latest = files.latest_before(server_round)
    if latest is not None:
        found = _read_file(files, latest, reference)
        if found is not None:
            return found.arrays, found.round
    return _zeros(reference).arrays, 0


def forget_run(state: RecordDict, state_path: Path, run_uid: str) -> None:
    """Delete a finished run's c_k, pending or not (state and disk). A run extended later
    restarts c_k at 0."""
    state.array_records.pop(STATE_ARRAYS, None)
    state.config_records.pop(STATE_META, None)
    _drop_pending(state)
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
    """Commit c_k^+ of ``server_round`` at once (a server without acknowledgement): state and an
    atomic file.

    Older files than ``loaded_round`` are removed (the one just read stays, so a resumed
    ``server_round`` still finds it). A read-only state path only warns.
    """
    c = Control(dict(c_new), server_round, "", loaded_round)
    _to_state(state, STATE_ARRAYS, STATE_META, run_uid, c)
    _drop_pending(state)
    return _write_file(_files(state_path, run_uid), c, keep_from=loaded_round)


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
        The round that produced ``c_local`` (the parent of c_k^+; its file stays).
    acknowledged : bool
        The server acknowledges replies (``scaffold.accepted``): c_k^+ stays pending
        (:func:`keep_pending`) instead of being committed at once (:func:`save_control`).

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
        acknowledged: bool = False,
    ) -> None:
        params = dict(model.named_parameters())
        device = next(model.parameters()).device
        self.option = option
        self.c_global = dict(c_global)
        self.c_local = dict(c_local)
        self.grad_at_global = grad_at_global
        self.loaded_round = loaded_round
        self.acknowledged = acknowledged
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
