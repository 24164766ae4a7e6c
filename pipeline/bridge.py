"""The GeodesicBridge training system (SPEC §5): pullback energy, density hinge, on-manifold term.

The network is `models.geodesic_bridge.GeodesicBridge`; the metric is a frozen
trained encoder E (GAGA), whose decoder G supplies the on-manifold term. A batch
is a point cloud of B training activations (`data.targets.PointClouds`); its
first and second halves are the endpoints of B/2 curves. Training draws T
uniform times per step, an unbiased estimate of the time integrals (on a fixed
grid the chord is not the exact minimiser under a flat metric); validation uses
the fixed grid t = 1/(T+1) … T/(T+1).

    L = mean ‖J_E(γ_t) γ̇_t‖²                                  energy (γ̇ by jvp in t)
      + w_dens · mean relu(mean_kNN_dist(γ_t, data) − h_0)    density hinge
      + w_man  · mean ‖G(E(γ_t)) − γ_t‖² / σ²                 on-manifold (decoder consistency)
"""

from __future__ import annotations

import lightning as L
import torch

from models.geodesic_bridge import GeodesicBridge, pullback_speed2
from pipeline.common import adamw_warmup_cosine


def knn_mean_distance(points: torch.Tensor, data: torch.Tensor, k: int, exclude_self: bool = False) -> torch.Tensor:
    """Mean distance from each point to its k nearest data rows. (M, d), (N, d) → (M,)"""
    dist = torch.cdist(points, data, compute_mode="donot_use_mm_for_euclid_dist")  # (M, N), exact
    near = dist.topk(k + int(exclude_self), dim=1, largest=False).values
    return near[:, int(exclude_self) :].mean(1)


def drift(curve: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """Max over t of the distance from γ_t to the nearest data row, over the chord length. (P, T, d) → (P,)

    T includes both ends; the ends are data points themselves when the pairs are.
    """
    P, T, d = curve.shape
    nearest = torch.cdist(curve.reshape(P * T, d), data, compute_mode="donot_use_mm_for_euclid_dist").min(1).values
    return nearest.view(P, T).max(1).values / (curve[:, -1] - curve[:, 0]).norm(dim=1)


class BridgeSystem(L.LightningModule):
    """Trains a GeodesicBridge against a frozen encoder (and, for the on-manifold term, its decoder).

    Args:
        bridge: the curve network, its normalisation fitted on the training activations.
        encode: E, rows (N, d) → (N, k); frozen, eval mode.
        reconstruct: x ↦ G(E(x)) in the units of x, or None to drop the on-manifold term.
        data: the training activations (N, d), for the density hinge and drift.
        times: T, the times per curve: uniform draws in training, the grid 1/(T+1) … T/(T+1) in validation.
        density, manifold: weights w_dens and w_man (0 drops a term).
        knn, h0: the density hinge's k and threshold (the data's own mean kNN distance when None).
        manifold_scale: σ² dividing the on-manifold term (the encoder's input variance).
        lr, weight_decay, warmup_fraction: AdamW with warm-up then cosine decay.
    """

    def __init__(self, bridge: GeodesicBridge, encode, reconstruct, data: torch.Tensor, times: int = 16,
                 density: float = 1.0, manifold: float = 1.0, knn: int = 5, h0: float | None = None,
                 manifold_scale: float = 1.0, lr: float = 1e-3, weight_decay: float = 0.0,
                 warmup_fraction: float = 0.02):  # fmt: skip
        super().__init__()
        self.bridge, self.encode, self.reconstruct = bridge, encode, reconstruct
        self.register_buffer("data", data)
        self.register_buffer("t", torch.arange(1, times + 1, dtype=data.dtype) / (times + 1))
        if h0 is None:
            h0 = float(knn_mean_distance(data, data, knn, exclude_self=True).mean())
        self.save_hyperparameters(ignore=["bridge", "encode", "reconstruct", "data"])
        self.hparams.h0 = h0

    def terms(self, x_a: torch.Tensor, x_b: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        hp = self.hparams
        curve, velocity = self.bridge.velocity(x_a, x_b, t)  # (P, T, d) twice
        terms = {"energy": pullback_speed2(self.encode, curve, velocity).mean()}
        flat = curve.reshape(-1, curve.shape[-1])  # (P·T, d)
        if hp.density:
            terms["density"] = torch.relu(knn_mean_distance(flat, self.data, hp.knn) - hp.h0).mean()
        if hp.manifold and self.reconstruct is not None:
            terms["manifold"] = (self.reconstruct(flat) - flat).pow(2).sum(1).mean() / hp.manifold_scale
        terms["loss"] = terms["energy"] + sum(getattr(hp, n) * terms[n] for n in ("density", "manifold") if n in terms)
        return terms

    def training_step(self, batch, _batch_idx):
        x = batch["x"]  # (B, d): the first half are start points, the second half end points
        half = len(x) // 2
        terms = self.terms(x[:half], x[half : 2 * half], torch.rand_like(self.t))
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, on_step=False, on_epoch=True, batch_size=half)
        return terms["loss"]

    def validation_step(self, batch, _batch_idx):
        x = batch["x"]
        half = len(x) // 2
        x_a, x_b = x[:half], x[half : 2 * half]
        terms = self.terms(x_a, x_b, self.t)
        ends = torch.cat([torch.zeros(1).to(self.t), self.t, torch.ones(1).to(self.t)])
        terms["drift_median"] = drift(self.bridge(x_a, x_b, ends), self.data).median()
        self.log_dict({f"val/{k}": v for k, v in terms.items()}, sync_dist=True, batch_size=half)

    def configure_optimizers(self):
        hp = self.hparams
        total = int(self.trainer.estimated_stepping_batches)
        return adamw_warmup_cosine(self.bridge.parameters(), hp.lr, hp.weight_decay, max(1, round(hp.warmup_fraction * total)), total)
