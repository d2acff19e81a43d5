"""Architecture derivation: α -> readable genotype -> discrete denoiser (FedAutoMRI Sec. 2.2).

"After the model architecture search, the operations with the top two weights are selected ...
for each pair of nodes" (FedAutoMRI). We read this as DARTS' rule, which the authors' public code
implements (``parse(alpha, k=2)``) and whose published genotype reproduces GAutoMRI's 0.0487M
weights: for every intermediate node, each incoming edge is scored by its strongest operation
(softmax of α over operations, Eq. 6) and the 2 best-scoring edges are kept, each with that
operation. Unlike the public code, all 8 candidates are eligible (it drops the last primitive,
sep_conv_7x7, as if it were DARTS' ``none``).

A genotype file is JSON::

    {"format": "fedunroll.genotype/1", "channels": 16, "num_cells": 3,
     "nodes": [[{"op": "sep_conv_3x3", "input": 1}, {"op": "sep_conv_5x5", "input": 0}], ...]}

with inputs ``0`` = ``c_{k-2}``, ``1`` = ``c_{k-1}``, ``2 + i`` = node ``i``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recon.fileio import atomic_write_json
from recon.models.denoisers import ComplexDenoiser
from recon.nas.cell import DerivedNet
from recon.nas.ops import PRIMITIVES

FORMAT = "fedunroll.genotype/1"


@dataclass(frozen=True)
class Genotype:
    """A discrete cell plus the stack it is used in.

    Attributes
    ----------
    nodes : tuple of tuple of (op, input)
        Per intermediate node, the kept edges as (operation name, input state index).
    channels, num_cells : int
        Feature maps and stacked cells of the derived denoiser.
    """

    nodes: tuple[tuple[tuple[str, int], ...], ...]
    channels: int = 16
    num_cells: int = 3

    def __post_init__(self) -> None:
        _validate(self.to_dict(), "genotype")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/TOML-serialisable dict (see the module docstring)."""
        return {
            "format": FORMAT,
            "channels": self.channels,
            "num_cells": self.num_cells,
            "nodes": [[{"op": op, "input": j} for op, j in node] for node in self.nodes],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "genotype") -> Genotype:
        """Parse :meth:`to_dict` output; errors name ``where`` and the offending field."""
        _validate(data, where)
        nodes = tuple(
            tuple((str(e["op"]), int(e["input"])) for e in node) for node in data["nodes"]
        )
        return cls(nodes, int(data.get("channels", 16)), int(data.get("num_cells", 3)))

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the genotype as indented JSON (atomically) and return the path."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Genotype:
        """Read a file written by :meth:`save`."""
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{p}: cannot read a genotype ({err})") from err
        if not isinstance(data, dict):
            raise ValueError(f"{p}: a genotype file holds a JSON object")
        return cls.from_dict(data, where=str(p))


def _validate(data: Mapping[str, Any], where: str) -> None:
    fmt = data.get("format", FORMAT)
    if fmt != FORMAT:
        raise ValueError(f"{where}: format {fmt!r} is not {FORMAT!r}")
    for key in ("channels", "num_cells"):
        value = data.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: {key} must be a positive int, got {value!r}")
    nodes = data.get("nodes")
    if not isinstance(nodes, Sequence) or isinstance(nodes, str) or not nodes:
        raise ValueError(f"{where}: 'nodes' must be a non-empty list of nodes")
    for i, node in enumerate(nodes):
        if not isinstance(node, Sequence) or isinstance(node, str) or not node:
            raise ValueError(f"{where}: nodes[{i}] must be a non-empty list of edges")
        for e, edge in enumerate(node):
            field = f"{where}: nodes[{i}][{e}]"
            if isinstance(edge, Mapping):
                op, j = edge.get("op"), edge.get("input")
            elif isinstance(edge, Sequence) and not isinstance(edge, str) and len(edge) == 2:
                op, j = edge
            else:
                raise ValueError(f"{field} must be {{'op': name, 'input': index}}")
            if op not in PRIMITIVES:
                raise ValueError(f"{field}.op: unknown operation {op!r}; one of {PRIMITIVES}")
            if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < 2 + i:
                raise ValueError(f"{field}.input: {j!r} is not a state index in [0, {i + 1}]")


def _softmax(a: np.ndarray) -> np.ndarray:
    z = np.exp(a - a.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def derive_genotype(
    alpha: Mapping[str, np.ndarray] | Sequence[np.ndarray],
    k: int = 2,
    channels: int = 16,
    num_cells: int = 3,
) -> Genotype:
    """Discretise α: per node, the ``k`` strongest incoming edges, each with its best operation.

    Parameters
    ----------
    alpha : dict ``{"node<i>": [2 + i, 8]}`` (``alpha_state()``) or list of such arrays
        Architecture weights (logits); edges are ranked by ``max softmax(α_edge)``.
    k : int
        Edges kept per node (FedAutoMRI: 2; a node with fewer inputs keeps all of them).
    channels, num_cells : int
        Stored in the genotype for :func:`build_from_genotype`.

    Returns
    -------
    Genotype
        Ties break towards the lower input index; kept edges are listed by input index.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if isinstance(alpha, Mapping):
        keys = [f"node{i}" for i in range(len(alpha))]
        if sorted(alpha) != sorted(keys):
            raise ValueError(f"alpha keys {sorted(alpha)} are not node0..node{len(alpha) - 1}")
        arrays = [np.asarray(alpha[key], dtype=np.float64) for key in keys]
    else:
        arrays = [np.asarray(a, dtype=np.float64) for a in alpha]
    nodes = []
    for i, a in enumerate(arrays):
        if a.shape != (2 + i, len(PRIMITIVES)):
            raise ValueError(f"alpha node{i}: shape {a.shape} != {(2 + i, len(PRIMITIVES))}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"alpha node{i}: non-finite values")
        w = _softmax(a)
        best_op = w.argmax(axis=-1)
        score = w.max(axis=-1)
        kept = sorted(range(2 + i), key=lambda j: (-score[j], j))[:k]
        nodes.append(tuple((PRIMITIVES[int(best_op[j])], j) for j in sorted(kept)))
    return Genotype(tuple(nodes), channels, num_cells)


def build_from_genotype(
    genotype: Genotype | str | os.PathLike[str],
    channels: int | None = None,
    num_cells: int | None = None,
) -> ComplexDenoiser:
    """The derived denoiser ``x + D(x)`` for complex images ``[B, H, W]``, freshly initialised.

    ``genotype`` may be a path to a genotype file; ``channels`` / ``num_cells`` override the
    values stored in the genotype.
    """
    g = genotype if isinstance(genotype, Genotype) else Genotype.load(genotype)
    net = DerivedNet(
        g.nodes,
        channels=g.channels if channels is None else channels,
        num_cells=g.num_cells if num_cells is None else num_cells,
    )
    return ComplexDenoiser(net, residual=True)


# The genotype published with the authors' code (GAutoMRI ``darts/genotypes.py``, "FedNAS_V1").
# With C = 16 and 3 cells its denoiser has 48,690 weights: GAutoMRI Table III's 0.0487M.
PUBLISHED = Genotype(
    (
        (("sep_conv_5x5", 0), ("sep_conv_3x3", 1)),
        (("sep_conv_3x3", 1), ("sep_conv_5x5", 2)),
        (("sep_conv_5x5", 0), ("std_conv_7x7", 3)),
    ),
    channels=16,
    num_cells=3,
)
