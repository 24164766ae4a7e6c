"""GAGA: geometry-aware autoencoders (Sun et al. 2025, arXiv 2410.12779), docs/method.md §4.

An encoder E: R^D → R^k and a decoder G: R^k → R^D, MLPs whose hidden
layers are Linear → BatchNorm → ReLU (GAGA-Jac: Linear → SiLU). Inputs are the raw activations h (d);
for GAGA-PHATE the ambient space is PCA(D) of h, a fixed projection kept in
the module, so that `encode` maps raw h to the latent and the pullback metric
lives on the raw input space. Ambient inputs are standardised `(a − μ)/σ`
with a scalar σ. Weights and buffers go to `model.safetensors`, constructor
arguments to `config.json` (`PyTorchModelHubMixin`): loading never unpickles.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from geosteer.models import arguments
from geosteer.models.hub import GeometryMismatch, ShippedGeometry

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU}


def mlp(sizes: list[int], activation: str = "relu", batch_norm: bool = True) -> nn.Sequential:
    """Linear → [BatchNorm] → activation for every hidden layer; the last layer is linear."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is unknown; use one of {sorted(ACTIVATIONS)}.")
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers += [nn.BatchNorm1d(b), ACTIVATIONS[activation]()] if batch_norm else [ACTIVATIONS[activation]()]
    return nn.Sequential(*layers)


class GAGA(nn.Module, ShippedGeometry, family="gaga", tags=["geosteer", "gaga", "steering-geometry"]):
    """Encoder and decoder of one learned geometry.

    Args:
        input_dim: d, the width of the raw activations h.
        latent_dim: k.
        hidden: encoder widths (the decoder mirrors them).
        pca_dim: D for a PCA ambient space (GAGA-PHATE), or None for raw h (GAGA-Out).
        readout_dim: K+1 for GAGA-Out's linear read-out A: R^k → R^{K+1} of √q, or None.
        activation: of the hidden layers, "relu" or "silu" (smooth: GAGA-Jac fits its Jacobian).
        batch_norm: BatchNorm in the hidden layers. Off for GAGA-Jac: in training mode it couples the
            points of a batch, so a point's Jacobian would depend on the others.
        meta: JSON-able facts to ship with the weights (LM, layer, task schema, metrics).
    """

    def __init__(
        self,
        input_dim: int,
        latent_dim: int,
        hidden: list[int] | tuple[int, ...] = (256, 128, 64),
        pca_dim: int | None = None,
        readout_dim: int | None = None,
        activation: str = "relu",
        batch_norm: bool = True,
        meta: dict[str, Any] | None = None,
    ):
        super().__init__()
        arguments.counts("GAGA", optional=("pca_dim", "readout_dim"), input_dim=input_dim, latent_dim=latent_dim, pca_dim=pca_dim,
                         readout_dim=readout_dim)  # fmt: skip
        arguments.ambient_width("GAGA", input_dim, pca_dim)
        hidden = arguments.widths("GAGA", "hidden", hidden)
        self.input_dim, self.latent_dim, self.pca_dim, self.meta = (
            input_dim,
            latent_dim,
            pca_dim,
            arguments.json_facts("GAGA", meta),
        )
        ambient = pca_dim or input_dim
        self.register_buffer("shift", torch.zeros(ambient))  # μ of the ambient inputs
        self.register_buffer("scale", torch.ones(()))  # σ, one scalar
        self.register_ambient()
        self.encoder = mlp([ambient, *hidden, latent_dim], activation, batch_norm)
        self.decoder = mlp([latent_dim, *reversed(hidden), ambient], activation, batch_norm)
        self.readout = nn.Linear(latent_dim, readout_dim) if readout_dim else None

    @torch.no_grad()
    def fit_normalisation(self, h: torch.Tensor) -> None:
        """Set the PCA projection (if any) and the standardisation from training activations h (N, d)."""
        a = self.fit_ambient(h)
        self.shift.copy_(a.mean(0))
        self.scale.copy_((a - a.mean(0)).pow(2).mean().sqrt().clamp_min(1e-12))  # one std over all entries

    def standardise(self, a: torch.Tensor) -> torch.Tensor:
        return (a - self.shift) / self.scale  # (B, D)

    def unstandardise(self, s: torch.Tensor) -> torch.Tensor:
        return s * self.scale + self.shift  # (B, D)

    def inputs(self, h: torch.Tensor) -> torch.Tensor:
        """What the encoder sees and the decoder reconstructs: standardised ambient inputs. (B, d) → (B, D)"""
        return self.standardise(self.ambient(h, rows=True))

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """Raw activations to the latent. (B, d) → (B, k)"""
        return self.encoder(self.inputs(h))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent to ambient activations (PCA coordinates for GAGA-PHATE). (B, k) → (B, D)"""
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[-1:] != (self.latent_dim,):
            raise GeometryMismatch(f"GAGA.decode takes latents (B, {self.latent_dim}); got "
                                   f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}.")  # fmt: skip
        self.check_dtype(z, "GAGA.decode", "latents", "z")
        return self.unstandardise(self.decoder(z))

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent and reconstruction in standardised units. (B, d) → (B, k), (B, D)"""
        z = self.encode(h)
        return z, self.decoder(z)
