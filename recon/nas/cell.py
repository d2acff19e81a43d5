"""DARTS-style cells and the denoisers built by stacking them (GAutoMRI Fig. 2, FedAutoMRI Fig. 1).

A cell has two inputs, the outputs of the two previous cells ``c_{k-2}`` and ``c_{k-1}`` (the
stem output for the first cell), each passed through a ``1 x 1`` conv + ReLU, and ``num_nodes``
intermediate nodes (3 in FedAutoMRI: "only three nodes in the cell"). Node ``i`` sums one edge from
every earlier state: the two inputs and nodes ``0 .. i-1``. The cell output is the sum of the
intermediate nodes, so every cell keeps ``C`` channels (as in the authors' public code; with
``C = 16``, 3 cells and the published genotype this gives GAutoMRI's 0.0487M weights).

State indices used by edges and genotypes: ``0`` = ``c_{k-2}``, ``1`` = ``c_{k-1}``,
``2 + i`` = intermediate node ``i``.

The denoiser nets map ``[B, 2, H, W]`` to ``[B, 2, H, W]``: stem ``3 x 3`` conv (2 -> C), the
cells, head ``3 x 3`` conv (C -> 2). Wrap them in
:class:`~recon.models.denoisers.ComplexDenoiser` with ``residual=True`` (``x + D(x)``). The
public code puts a ReLU after the head, which would only let the denoiser add positive values to
a signed (real, imaginary) image; we leave it out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from recon.nas.ops import PRIMITIVES, MixedOp, make_op

NodeSpec = Sequence[tuple[str, int]]  # the (operation, input state) edges of one node
CellFn = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]  # (k, s0, s1) -> cell k output


def _preprocess(channels: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(channels, channels, 1), nn.ReLU())


class _SearchNode(nn.Module):
    """Intermediate node of a search cell: one MixedOp per earlier state, summed."""

    def __init__(self, channels: int, num_inputs: int):
        super().__init__()
        self.edges = nn.ModuleList(MixedOp(channels) for _ in range(num_inputs))

    def forward(self, states: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
        """``weights`` ``[num_inputs, n_ops]``: the softmaxed α of this node's edges."""
        outs = [edge(s, w) for edge, s, w in zip(self.edges, states, weights, strict=True)]
        return torch.stack(outs).sum(0)


class _DerivedNode(nn.Module):
    """Intermediate node of a derived cell: the kept operations on their input states, summed."""

    def __init__(self, channels: int, edges: NodeSpec):
        super().__init__()
        self.inputs = [int(j) for _, j in edges]
        self.ops = nn.ModuleList(make_op(op, channels) for op, _ in edges)

    def forward(self, states: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.stack([op(states[j]) for op, j in zip(self.ops, self.inputs)]).sum(0)


class SearchCell(nn.Module):
    """Cell of the search network: a :class:`~recon.nas.ops.MixedOp` on every edge."""

    def __init__(self, channels: int, num_nodes: int = 3):
        super().__init__()
        self.pre0 = _preprocess(channels)
        self.pre1 = _preprocess(channels)
        self.nodes = nn.ModuleList(_SearchNode(channels, 2 + i) for i in range(num_nodes))

    def forward(
        self, s0: torch.Tensor, s1: torch.Tensor, weights: Sequence[torch.Tensor]
    ) -> torch.Tensor:
        """``weights[i]`` ``[2 + i, n_ops]``: the softmaxed α of node ``i``'s edges."""
        states = [self.pre0(s0), self.pre1(s1)]
        for node, w in zip(self.nodes, weights, strict=True):
            states.append(node(states, w))
        return torch.stack(states[2:]).sum(0)  # [B, C, H, W]


class DerivedCell(nn.Module):
    """Cell of a derived (discrete) network: the edges a genotype keeps, one operation each."""

    def __init__(self, channels: int, nodes: Sequence[NodeSpec]):
        super().__init__()
        for i, edges in enumerate(nodes):
            inputs = [j for _, j in edges]
            if not inputs or any(not 0 <= j < 2 + i for j in inputs):
                raise ValueError(f"node {i}: inputs {inputs} must be non-empty and in [0, {i + 1}]")
        self.pre0 = _preprocess(channels)
        self.pre1 = _preprocess(channels)
        self.nodes = nn.ModuleList(_DerivedNode(channels, edges) for edges in nodes)

    def forward(self, s0: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
        states = [self.pre0(s0), self.pre1(s1)]
        for node in self.nodes:
            states.append(node(states))
        return torch.stack(states[2:]).sum(0)


class _CellStack(nn.Module):
    """Stem, cells chained on their two predecessors (Fig. 2a), head."""

    cells: nn.ModuleList

    def __init__(self, in_chans: int, channels: int):
        super().__init__()
        self.stem = nn.Conv2d(in_chans, channels, 3, padding=1)
        self.head = nn.Conv2d(channels, in_chans, 3, padding=1)

    def _run(self, x: torch.Tensor, cell: CellFn) -> torch.Tensor:
        s0 = s1 = self.stem(x)  # [B, C, H, W]; the first cell sees the stem twice
        for k in range(len(self.cells)):
            s0, s1 = s1, cell(k, s0, s1)
        return self.head(s1)  # [B, 2, H, W]


class SearchDenoiser(_CellStack):
    """Search network: stacked :class:`SearchCell` s sharing one set of architecture weights α.

    α holds one ``[2 + i, len(PRIMITIVES)]`` tensor per intermediate node, shared by all cells
    (DARTS' normal cell). α is deliberately *not* registered as a parameter or buffer, so it is
    absent from ``state_dict()`` and ``parameters()``: the θ arrays aggregated by FedAvg never
    contain it, and α travels in its own record (``nas.alpha``) through :meth:`alpha_state` /
    :meth:`load_alpha_state`. ``.to()`` / ``.cuda()`` / ``.double()`` still move it.

    Parameters
    ----------
    channels : int
        Feature maps ``C`` inside the cells (GAutoMRI: 16).
    num_cells : int
        Stacked cells (3 for 0.0487M weights at ``C = 16``).
    num_nodes : int
        Intermediate nodes per cell (FedAutoMRI: 3).
    in_chans : int
        2 (real, imaginary).
    alpha_init_std : float
        α starts at ``alpha_init_std * N(0, 1)`` (DARTS: 1e-3), i.e. almost uniform weights.
    generator : torch.Generator, optional
        Seeds the α draw (the weights use the global RNG, like every other denoiser).
    """

    def __init__(
        self,
        channels: int = 16,
        num_cells: int = 3,
        num_nodes: int = 3,
        in_chans: int = 2,
        alpha_init_std: float = 1e-3,
        generator: torch.Generator | None = None,
    ):
        super().__init__(in_chans, channels)
        if channels < 1 or num_cells < 1 or num_nodes < 1:
            raise ValueError("channels, num_cells and num_nodes must be >= 1")
        self.channels = channels
        self.num_cells = num_cells
        self.num_nodes = num_nodes
        self.cells = nn.ModuleList(SearchCell(channels, num_nodes) for _ in range(num_cells))
        n_ops = len(PRIMITIVES)
        self._alphas: list[torch.Tensor] = [
            (alpha_init_std * torch.randn(2 + i, n_ops, generator=generator)).requires_grad_()
            for i in range(num_nodes)
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.op_weights()
        return self._run(x, lambda k, s0, s1: self.cells[k](s0, s1, weights))

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # α is not registered, so module-wide conversions (to, cuda, double) must move it here.
        # An unchanged tensor is kept as is, so optimisers built on it stay valid.
        super()._apply(fn, recurse)
        for i, a in enumerate(self._alphas):
            with torch.no_grad():
                moved = fn(a)
            if moved is not a:
                self._alphas[i] = moved.detach().requires_grad_(a.requires_grad)
        return self

    def arch_parameters(self) -> list[torch.Tensor]:
        """α, one leaf tensor per node (optimise them with their own optimiser)."""
        return list(self._alphas)

    def weight_parameters(self) -> Iterator[nn.Parameter]:
        """θ: every registered parameter (α is never among them)."""
        return self.parameters()

    def op_weights(self) -> list[torch.Tensor]:
        """Eq. 6 mixing weights: ``softmax(α)`` over the operations of every edge."""
        return [F.softmax(a, dim=-1) for a in self._alphas]

    def alpha_state(self) -> dict[str, np.ndarray]:
        """α as numpy float32 arrays ``{"node0": [2, 8], "node1": [3, 8], ...}`` (copies)."""
        return {f"node{i}": a.detach().cpu().numpy().copy() for i, a in enumerate(self._alphas)}

    def load_alpha_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Copy α in place from :meth:`alpha_state`-shaped arrays (keys, shapes, finite checked)."""
        expected = {f"node{i}": tuple(a.shape) for i, a in enumerate(self._alphas)}
        if set(state) != set(expected):
            raise ValueError(f"alpha state keys {sorted(state)} != expected {sorted(expected)}")
        for i, a in enumerate(self._alphas):
            key = f"node{i}"
            value = np.asarray(state[key])
            if value.shape != expected[key]:
                raise ValueError(f"alpha[{key!r}]: shape {value.shape} != {expected[key]}")
            if not np.all(np.isfinite(value)):
                raise ValueError(f"alpha[{key!r}]: non-finite values")
            with torch.no_grad():
                a.copy_(torch.as_tensor(value, dtype=a.dtype, device=a.device))


class DerivedNet(_CellStack):
    """Discrete network: stacked :class:`DerivedCell` s, all with the same genotype ``nodes``."""

    def __init__(
        self, nodes: Sequence[NodeSpec], channels: int = 16, num_cells: int = 3, in_chans: int = 2
    ):
        super().__init__(in_chans, channels)
        if channels < 1 or num_cells < 1:
            raise ValueError("channels and num_cells must be >= 1")
        self.cells = nn.ModuleList(DerivedCell(channels, nodes) for _ in range(num_cells))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, lambda k, s0, s1: self.cells[k](s0, s1))
