"""Denoisers and unrolled networks; ``build_model(ModelConfig(...))`` is the entry point."""

from recon.models.config import ModelConfig, build_model
from recon.models.denoisers import ComplexDenoiser, ResNet5, UNet, build_denoiser, count_parameters
from recon.models.unrolled import MoDL, Unrolled, UnrolledPGD

__all__ = [
    "ComplexDenoiser",
    "MoDL",
    "ModelConfig",
    "ResNet5",
    "UNet",
    "Unrolled",
    "UnrolledPGD",
    "build_denoiser",
    "build_model",
    "count_parameters",
]
