"""The typed unit of data that flows from a site's files into the models.

A :class:`Sample` holds one 2D slice, already normalised and undersampled, with everything the
reconstruction needs. Masks and coil maps travel with the sample (they are *data*, not model
state), so they can never leak into ``model.state_dict()`` and never reach the server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from recon.physics.sense import SenseOp


@dataclass
class Sample:
    """One slice (unbatched) or a batch of slices (leading batch dim ``B``).

    Attributes
    ----------
    kspace : complex64 tensor ``[C, H, W]`` (batched ``[B, C, H, W]``)
        Undersampled multi-coil k-space ``y = P F S x`` (zeros where not sampled), normalised.
        ``H`` is the readout (frequency-encode) axis, ``W`` the phase-encode axis (fastMRI layout).
    mask : float32 tensor ``[H, W]`` (batched ``[B, H, W]``)
        Binary sampling pattern ``P`` (1 = sampled).
    maps : complex64 tensor ``[C, H, W]`` (batched ``[B, C, H, W]``)
        Coil sensitivities ``S`` (ESPIRiT / JSENSE / known).
    target : float32 tensor ``[H, W]`` (batched ``[B, H, W]``)
        RSS magnitude of the fully sampled coil images, same normalisation as ``kspace``.
    image : complex64 tensor ``[H, W]`` (batched ``[B, H, W]``), optional
        Coil-combined fully sampled reference ``S^H F^H k_full`` for complex-valued losses.
    meta : dict
        ``file``, ``slice``, ``site`` and anything else useful for reports (not batched tensors).
    """

    kspace: torch.Tensor
    mask: torch.Tensor
    maps: torch.Tensor
    target: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    image: torch.Tensor | None = None

    def physics(self) -> SenseOp:
        """The forward operator ``A = P F S`` of this sample (its own maps and mask)."""
        return SenseOp(self.maps, self.mask)

    def to(self, device: torch.device | str) -> Sample:
        """This sample on ``device``. Host tensors bound for a GPU go through pinned memory
        and are copied asynchronously (the copy overlaps the host's work until a kernel
        needs the data; PyTorch keeps the pinned buffer until the copy is done)."""
        target = torch.device(device)

        def move(t: torch.Tensor) -> torch.Tensor:
            if target.type == "cuda" and t.device.type == "cpu":
                return t.pin_memory().to(target, non_blocking=True)
            return t.to(target)

        return Sample(
            move(self.kspace),
            move(self.mask),
            move(self.maps),
            move(self.target),
            dict(self.meta),
            None if self.image is None else move(self.image),
        )


class Slices(Protocol):
    """What the trainers need of a set of slices: its length and one :class:`Sample` by index.

    A :class:`~recon.data.dataset.SiteDataset`, a ``torch.utils.data.Subset`` of one, or a list.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int, /) -> Sample: ...


def collate(samples: list[Sample]) -> Sample:
    """Stack same-shaped samples into a batch (use batch size 1 for mixed matrix/coil sizes)."""
    shapes = {(s.kspace.shape, s.maps.shape) for s in samples}
    if len(shapes) != 1:
        raise ValueError(
            f"cannot batch slices of different shapes {sorted(map(str, shapes))}; use batch size 1"
        )
    return Sample(
        torch.stack([s.kspace for s in samples]),
        torch.stack([s.mask for s in samples]),
        torch.stack([s.maps for s in samples]),
        torch.stack([s.target for s in samples]),
        {"items": [s.meta for s in samples]},
        None if any(s.image is None for s in samples) else torch.stack([s.image for s in samples]),  # type: ignore[misc]
    )
