"""Model checkpoints: weights plus the configuration needed to rebuild them, written atomically."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from recon.fileio import atomic_torch_save
from recon.models.config import ModelConfig, build_model
from recon.models.unrolled import Unrolled


def save_checkpoint(
    model: torch.nn.Module, cfg: ModelConfig, path: str | os.PathLike[str], **extra: Any
) -> None:
    """Save ``{"state_dict", "model_config", **extra}`` atomically."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save({"state_dict": state, "model_config": cfg.model_dump(), **extra}, path)


def load_checkpoint(
    path: str | os.PathLike[str], device: torch.device | str = "cpu"
) -> tuple[Unrolled, ModelConfig, dict[str, Any]]:
    """Rebuild the model of a checkpoint; errors name the file and the missing field."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    ckpt = torch.load(p, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model_config"):
        if key not in ckpt:
            raise ValueError(f"checkpoint {p}: missing field {key!r}")
    cfg = ModelConfig.model_validate(ckpt["model_config"])
    model = build_model(cfg)
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device), cfg, ckpt
