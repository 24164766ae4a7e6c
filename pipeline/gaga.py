"""The GAGA training system (Sun et al. 2025; docs/method.md §4): the losses, the schedule and their logging.

The network is `geosteer.models.gaga.GAGA`; this module owns everything about training it,
and registers the family `gaga` (`pipeline.family`'s contract) that `pipeline.train` calls.
A batch is a point cloud of B activations with their target coordinates; the
B(B−1)/2 target distances are formed here, on the training device.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from omegaconf import DictConfig
from scipy.stats import spearmanr

from geosteer.data.targets import PairwiseTargets, stratified_sample, target_distances
from geosteer.data.tasks import Task
from geosteer.models.gaga import GAGA
from geosteer.models.metrics import FIT_ROWS, centred_gram_cosine, eigenvalue_scale, gram_matching_loss, pullback_of
from geosteer.pipeline.common import StageError
from geosteer.pipeline.family import Family, GeometrySystem, register_family, rounded

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

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


def encoder_jacobian(model: GAGA, x: torch.Tensor, create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The latent z = E(x) and J_E = ∂z/∂x at raw activations x, by one batched reverse pass over the k latent
    coordinates (rows of the batch must be independent: no BatchNorm). (B, d) → (B, k), (B, k, d)"""
    with torch.inference_mode(False), torch.enable_grad():  # validation runs in inference mode
        x = x.clone().requires_grad_()
        z = model.encode(x)  # (B, k)
        k = z.shape[1]
        rows = torch.eye(k, dtype=z.dtype, device=z.device).unsqueeze(1).expand(k, len(x), k)  # (k, B, k)
        (J,) = torch.autograd.grad(z, x, rows, is_grads_batched=True, create_graph=create_graph)  # (k, B, d)
    return z, J.transpose(0, 1)


def pullback_loss(J_E: torch.Tensor, factor: torch.Tensor, scale: float) -> torch.Tensor:
    """L_jac = Σ‖J_EᵀJ_E − c·FᵀF‖²_F / Σ‖c·FᵀF‖²_F with c = 1/(2·scale²): the pullback of E matched to G_out ≈ FᵀF
    in the units of the Hellinger targets d̂ = ‖√q_i − √q_j‖/(√2·scale). (B, k, d), (B, r, d)"""
    return gram_matching_loss(J_E, factor, 1 / (2 * scale**2))


class GAGASystem(GeometrySystem):
    """Trains a GAGA on one task's targets.

    Args:
        model: the network, its normalisation already fitted on the training activations.
        scale: std of the target distances over training pairs (d̂ = d / scale).
        dist, rec, cyc, pointwise, jac: loss weights; a zero weight skips the term (jac: `pullback_loss`,
            which needs the batches' output-pullback factors and a network without BatchNorm).
        decay: λ of the local weighting exp(−λ d̂).
        lr, weight_decay: AdamW.
        warmup_fraction: share of the run's steps spent warming up.
        coords_are_hellinger: the targets are s = √q/√2, so √s·√2 feeds the pointwise loss.
    """

    label = "GAGA"

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
        jac: float = 0.0,
    ):
        super().__init__()
        if pointwise and (model.readout is None or not coords_are_hellinger):
            raise ValueError("the pointwise loss needs Hellinger targets and a read-out (readout_dim=K+1)")
        if jac and not coords_are_hellinger:
            raise ValueError("the pullback loss's scale c = 1/(2·scale²) holds for Hellinger targets only")
        self.model = model
        # parts no loss term reaches are frozen (they were left untrained anyway): DDP refuses unused parameters
        model.decoder.requires_grad_(bool(rec or cyc))
        if model.readout is not None:
            model.readout.requires_grad_(bool(pointwise))
        self.save_hyperparameters(ignore=["model"])
        self._val: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._gram: list[torch.Tensor] = []

    def losses(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Every weighted term and their sum, plus the latent z (B, k)."""
        hp = self.hparams
        inputs = self.model.inputs(batch["x"])  # (B, D), standardised
        if hp.jac:
            z, J_E = encoder_jacobian(self.model, batch["x"], create_graph=self.training)  # (B, k), (B, k, d)
        else:
            z = self.model.encoder(inputs)  # (B, k)
        terms = {"dist": distance_loss(z, target_distances(batch["coords"], hp.scale), hp.decay)}
        if hp.rec:
            terms["rec"] = reconstruction_loss(self.model.decoder(z), inputs)
        if hp.cyc:
            terms["cyc"] = cycle_loss(self.model, z)
        if hp.pointwise:
            terms["pointwise"] = pointwise_loss(self.model, z, batch["coords"] * SQRT2)
        if hp.jac:
            terms["jac"] = pullback_loss(J_E, batch["pullback"], hp.scale)
            if not self.training:
                self._gram.append(centred_gram_cosine(J_E.detach().double(), batch["pullback"].double()))
        terms["loss"] = sum(getattr(hp, name) * value for name, value in terms.items())
        return terms, z

    def training_terms(self, batch):
        return self.losses(batch)[0], len(batch["x"])

    def validation_terms(self, batch):
        terms, z = self.losses(batch)
        self._val.append((z.detach(), batch["coords"]))
        return terms, len(batch["x"])

    def on_validation_epoch_end(self):
        z, coords = (torch.cat(parts) for parts in zip(*self._val))
        self._val.clear()
        quality = distance_quality(z, coords)
        if self._gram:  # the mean centred Gram cosine of G_E with G_out on the val points
            quality["gram_cosine"] = float(torch.cat(self._gram).mean())
            self._gram.clear()
        self.log_dict({f"val/{k}": v for k, v in quality.items()}, sync_dist=True)


@torch.no_grad()
def distance_quality(z: torch.Tensor, coords: torch.Tensor) -> dict[str, float]:
    """Pearson and Spearman correlation between latent and target distances over all pairs. (N, k), (N, m)"""
    latent, target = torch.pdist(z.double()), torch.pdist(coords.double())
    pearson = torch.corrcoef(torch.stack([latent, target]))[0, 1]
    return {"pearson": float(pearson), "spearman": float(spearmanr(latent.cpu(), target.cpu()).statistic)}


# ---- the family ------------------------------------------------------------------------------


@register_family("gaga")
class GagaFamily(Family):
    monitor = "val/dist"  # best checkpoint and early stopping

    def check(self, name: str, g: dict[str, Any]) -> None:
        loss = g["loss"]
        if loss["pointwise"] and g["target"] != "hellinger":
            raise StageError(
                f"geometry '{name}': loss.pointwise={loss['pointwise']} fits √q, which needs target=hellinger "
                f"(it is {g['target']}); set geometry.{name}.loss.pointwise=0."
            )
        if loss.get("jac") and (g["target"] != "hellinger" or g.get("batch_norm", True)):
            raise StageError(
                f"geometry '{name}': loss.jac={loss['jac']} matches each point's pullback to G_out, which needs "
                f"target=hellinger (it is {g['target']}) and batch_norm=false (it is {g.get('batch_norm', True)}: "
                f"BatchNorm couples a batch's points); set them, or geometry.{name}.loss.jac=0."
            )

    def uses_pullback(self, g: dict[str, Any]) -> bool:
        return bool(g["loss"].get("jac"))

    def build(self, g: dict[str, Any], d: int, K: int, meta: dict[str, Any], seed: int) -> tuple[GAGA, dict[str, Any]]:
        ctor = {
            "input_dim": d,
            "latent_dim": g["latent_dim"] or K,
            "hidden": list(g["hidden"]),
            "pca_dim": g["pca_dim"],
            "readout_dim": K + 1 if g["loss"]["pointwise"] else None,
            "activation": g.get("activation", "relu"),
            "batch_norm": g.get("batch_norm", True),
        }
        if ctor["pca_dim"] is not None and ctor["pca_dim"] > d:
            raise StageError(f"pca_dim={ctor['pca_dim']} exceeds the activation width d={d}; set pca_dim to at most {d}.")
        return GAGA(**ctor, meta=meta), ctor

    def system(self, model: GAGA, g: dict[str, Any], train: PairwiseTargets, K: int) -> GAGASystem:
        return GAGASystem(model, train.scale, **g["loss"], **g["optim"], coords_are_hellinger=g["target"] == "hellinger")

    @torch.no_grad()
    def evaluate(self, cfg: DictConfig, task: Task, g: dict[str, Any], model: GAGA, train: PairwiseTargets,
                 val: PairwiseTargets, folder: Path) -> dict[str, Any]:  # fmt: skip
        """Val Spearman/Pearson of latent vs target distances; draws `folder/training.png`."""
        z = model.encode(train[torch.arange(len(train.labels))]["x"])  # (N, k), every store row
        val_rows = torch.as_tensor(val.rows)
        val_batch = val[val_rows]
        val_coords = val_batch["coords"]  # (N_val, m)
        quality = distance_quality(z[val_rows], val_coords)
        metrics = {"val_spearman": quality["spearman"], "val_pearson": quality["pearson"]}
        # the eigenvalue scale λ_reg is taken from, on the training rows the evaluation fitted it on: eval and steering
        # both read it from the export, so a steered path is the one the evaluation scored
        sample = torch.as_tensor(stratified_sample(train.labels, train.rows, FIT_ROWS, cfg.seed))
        with torch.enable_grad():
            metrics["metric_scale"] = eigenvalue_scale(pullback_of(model).jacobian(train[sample]["x"]))
        if "pullback" in val_batch:  # G_E against G_out on the val points, each in its own prompt
            _, J_E = encoder_jacobian(model, val_batch["x"], create_graph=False)
            metrics["val_gram_cosine"] = float(centred_gram_cosine(J_E.double(), val_batch["pullback"].double()).mean())
        figure(task, model.meta.get("geometry", "gaga"), z, train.labels, val_rows, val_coords, train.scale, metrics,
               folder / "training.png")  # fmt: skip
        return metrics

    def headline(self, metrics: dict[str, Any]) -> dict[str, float]:
        return rounded(metrics, ("val_spearman", "val_gram_cosine"))

    def card(self, ctor: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        m, task = meta["metrics"], meta["task"]
        E = f"Its encoder E: R^{ctor['input_dim']} → R^{ctor['latent_dim']}"
        if "val_gram_cosine" in m:
            summary = (f"A GAGA encoder/decoder (Sun et al. 2025) trained as GAGA-Jac: {E} has its pullback `J_Eᵀ J_E` "
                       f"matched, point by point, to the LM's output metric G_out = J_sᵀJ_s (an amortised G_out: one "
                       f"encoder pass instead of the LM's tail); it is the steering metric.")  # fmt: skip
        else:
            summary = (f"A GAGA encoder/decoder (Sun et al. 2025). {E} matches latent distances to **{meta['target']}** "
                       f"target distances (divided by their training-pair std, {meta['target_scale']:.4g}); the "
                       f"pullback `J_Eᵀ J_E` of E is the steering metric.")  # fmt: skip
        rows = [("ambient space", f"PCA({ctor['pca_dim']}) of h" if ctor["pca_dim"] else "raw h"),
                ("hidden widths", f"{ctor['hidden']}, {ctor.get('activation', 'relu')}"),
                ("val Spearman, latent vs target distances", f"{m['val_spearman']:.4f}"),
                ("val Pearson", f"{m['val_pearson']:.4f}"), (f"best {m['monitor']}", f"{m['best_val']:.4g}")]  # fmt: skip
        if "val_gram_cosine" in m:
            rows.append(("val centred Gram cosine with G_out (own prompts)", f"{m['val_gram_cosine']:.4f}"))
        usage = f"z = geometry.encode(h)  # h: (B, {ctor['input_dim']}) activations at block {meta['layer']} → (B, {ctor['latent_dim']})"
        return {"tags": ["gaga"], "title": f"a learned steering geometry of {meta['lm']} on {task['name']}",
                "summary": summary, "rows": rows, "usage": usage}  # fmt: skip


def figure(task: Task, name: str, z: torch.Tensor, labels: np.ndarray, val_rows: torch.Tensor,
           val_coords: torch.Tensor, scale: float, metrics: dict[str, Any], path: Path) -> None:  # fmt: skip
    """Latent scatter (3-D when k ≥ 3) coloured by answer class, and val target vs latent distances."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = plt.figure(figsize=(11, 4.8))
    z3 = z.double()
    if z3.shape[1] > 3:  # the top-3 principal directions of the latent
        z3 = (z3 - z3.mean(0)) @ torch.linalg.svd(z3 - z3.mean(0), full_matrices=False).Vh[:3].T
    cmap = "twilight" if task.topology == "cyclic" else "viridis"
    if z3.shape[1] >= 3:
        ax = fig.add_subplot(1, 2, 1, projection="3d")
        sc = ax.scatter(*z3[:, :3].T.numpy(), c=labels, cmap=cmap, s=6)
    else:
        ax = fig.add_subplot(1, 2, 1)
        sc = ax.scatter(z3[:, 0].numpy(), z3[:, -1].numpy(), c=labels, cmap=cmap, s=6)
    fig.colorbar(sc, ax=ax, shrink=0.7, label="answer class")
    ax.set_title(f"{task.name} / {name}: latent")
    ax = fig.add_subplot(1, 2, 2)
    latent, target = torch.pdist(z[val_rows]).numpy(), (torch.pdist(val_coords) / scale).numpy()
    keep = np.random.default_rng(0).permutation(len(latent))[:20000]
    ax.scatter(target[keep], latent[keep], s=2, alpha=0.3)
    lim = max(target.max(), latent.max())
    ax.plot([0, lim], [0, lim], "k--", lw=0.8)
    ax.set(xlabel="target distance d̂", ylabel="latent distance", title=f"val pairs: Spearman {metrics['val_spearman']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
