"""The GAGA training system (Sun et al. 2025; SPEC §4): the losses, the schedule and their logging.

The network is `models.gaga.GAGA`; this module owns everything about training it.
A batch is a point cloud of B activations with their target coordinates; the
B(B−1)/2 target distances are formed here, on the training device.
"""

from __future__ import annotations

import math

import lightning as L
import torch
from scipy.stats import spearmanr

from data.targets import target_distances
from models.gaga import GAGA
from pipeline.common import warmup_cosine

SQRT2 = math.sqrt(2.0)


def distance_loss(z: torch.Tensor, dist: torch.Tensor, decay: float) -> torch.Tensor:
    """L_dist = mean over pairs of exp(−λ d̂) · (‖z_i − z_j‖ − d̂)². z (B, k), dist (B(B−1)/2,) in pdist order."""
    return (torch.exp(-decay * dist) * (torch.pdist(z) - dist).pow(2)).mean()


def reconstruction_loss(recon: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """L_rec = mean over points of ‖G(E(x)) − x‖². (B, D), (B, D)"""
    return (recon - inputs).pow(2).sum(1).mean()


def cycle_loss(model: GAGA, z: torch.Tensor) -> torch.Tensor:
    """L_cyc = mean over points of ‖E(G(z)) − z‖², z = E(x). (B, k)"""
    return (model.encoder(model.decoder(z)) - z).pow(2).sum(1).mean()


def pointwise_loss(model: GAGA, z: torch.Tensor, sqrt_q: torch.Tensor) -> torch.Tensor:
    """L_pt = mean over points of ‖A·z − √q‖², A the learned linear read-out. (B, k), (B, K+1)"""
    return (model.readout(z) - sqrt_q).pow(2).sum(1).mean()


class GAGASystem(L.LightningModule):
    """Trains a GAGA on one task's targets.

    Args:
        model: the network, its normalisation already fitted on the training activations.
        scale: std of the target distances over training pairs (d̂ = d / scale).
        dist, rec, cyc, pointwise: loss weights; a zero weight skips the term.
        decay: λ of the local weighting exp(−λ d̂).
        lr, weight_decay: AdamW.
        warmup_fraction: share of the run's steps spent warming up.
        coords_are_hellinger: the targets are s = √q/√2, so √s·√2 feeds the pointwise loss.
    """

    def __init__(
        self,
        model: GAGA,
        scale: float,
        dist: float,
        rec: float,
        cyc: float,
        pointwise: float,
        decay: float,
        lr: float,
        weight_decay: float,
        warmup_fraction: float,
        coords_are_hellinger: bool,
    ):
        super().__init__()
        assert not pointwise or (model.readout is not None and coords_are_hellinger), "pointwise: √q read-out"
        self.model = model
        self.save_hyperparameters(ignore=["model"])
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []

    def losses(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Every weighted term and their sum, plus the latent z (B, k)."""
        hp = self.hparams
        inputs = self.model.inputs(batch["x"])  # (B, D), standardised
        z = self.model.encoder(inputs)  # (B, k)
        terms = {"dist": distance_loss(z, target_distances(batch["coords"], hp.scale), hp.decay)}
        if hp.rec:
            terms["rec"] = reconstruction_loss(self.model.decoder(z), inputs)
        if hp.cyc:
            terms["cyc"] = cycle_loss(self.model, z)
        if hp.pointwise:
            terms["pointwise"] = pointwise_loss(self.model, z, batch["coords"] * SQRT2)
        terms["loss"] = sum(getattr(hp, name) * value for name, value in terms.items())
        return terms, z

    def training_step(self, batch, _batch_idx):
        terms, _ = self.losses(batch)
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, on_step=False, on_epoch=True, batch_size=len(batch["x"]))
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0], on_step=False, on_epoch=True)
        return terms["loss"]

    def validation_step(self, batch, _batch_idx):
        terms, z = self.losses(batch)
        self.log_dict({f"val/{k}": v for k, v in terms.items()}, sync_dist=True, batch_size=len(batch["x"]))
        self._val.append((z.detach(), batch["coords"]))

    def on_validation_epoch_end(self):
        z, coords = (torch.cat(parts) for parts in zip(*self._val))
        self._val.clear()
        quality = distance_quality(z, coords)
        self.log_dict({f"val/{k}": v for k, v in quality.items()}, sync_dist=True)

    def configure_optimizers(self):
        hp = self.hparams
        opt = torch.optim.AdamW(self.model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        warmup = max(1, round(hp.warmup_fraction * total))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, warmup, total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@torch.no_grad()
def distance_quality(z: torch.Tensor, coords: torch.Tensor) -> dict[str, float]:
    """Pearson and Spearman correlation between latent and target distances over all pairs. (N, k), (N, m)"""
    latent, target = torch.pdist(z.double()), torch.pdist(coords.double())
    pearson = torch.corrcoef(torch.stack([latent, target]))[0, 1]
    return {"pearson": float(pearson), "spearman": float(spearmanr(latent.cpu(), target.cpu()).statistic)}
