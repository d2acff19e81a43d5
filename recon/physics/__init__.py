"""Multi-coil SENSE physics: centered FFTs, ``A = P F S``, CG, masks and coil maps."""

from recon.physics.cg import conjugate_gradient
from recon.physics.fft import center_crop, fft2c, ifft2c, rss
from recon.physics.sense import FFTOp, LinearOp, ScaledIdentityPlusNormal, SenseOp

__all__ = [
    "FFTOp",
    "LinearOp",
    "ScaledIdentityPlusNormal",
    "SenseOp",
    "center_crop",
    "conjugate_gradient",
    "fft2c",
    "ifft2c",
    "rss",
]
