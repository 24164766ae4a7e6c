"""The INNSteer training system (docs/method.md §8) and its steering test through the LM.

The network is `models.innsteer.InnSteer`; this module owns the objective, its
logging, the non-finite guard, `steering_success`, which injects steered
activations into the real LM and reads its answer back, and the family `innsteer`
(`pipeline.family`'s contract) that `pipeline.train` calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from omegaconf import DictConfig
from sklearn.linear_model import LogisticRegression

from geosteer.data.store import ActivationStore
from geosteer.data.targets import PairwiseTargets
from geosteer.data.tasks import Task
from geosteer.models.innsteer import BLOCKS, InnSteer
from geosteer.models.steering import carrier_rows, concept_q, steering_pairs
from geosteer.models.tail import CarrierTail
from geosteer.pipeline.common import StageError, lm_of_store, log
from geosteer.pipeline.family import Family, GeometrySystem, register_family, rounded

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


def classes_of(coords: torch.Tensor, K: int) -> torch.Tensor:
    """Label-free answer classes: the arg-max concept of q, from Hellinger coordinates √q/√2. (B, K+1) → (B,)"""
    return coords[:, :K].argmax(1)


def nll(z: torch.Tensor, log_det: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """mean_i [½‖z_i − m_i‖² − log|det J_φ(x_i)|], each point's unit-Gaussian NLL about its centre m_i. (B, D), (B,), (B, D)

    With m_i = μ_{c_i} this is docs/method.md §8's class-conditional objective.
    """
    return (0.5 * (z - centres).pow(2).sum(1) - log_det).mean()


def soft_centres(coords: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """Σ_c q̃_ic μ_c, q̃ the concept part of q renormalised, from Hellinger coordinates √q/√2. (B, K+1), (K, D) → (B, D)"""
    q = 2 * coords[:, : len(means)].pow(2)
    return (q / q.sum(1, keepdim=True).clamp_min(1e-12)) @ means


def round_trip_error(model: InnSteer, h: torch.Tensor) -> torch.Tensor:
    """‖φ⁻¹(φ(x)) − x‖ / ‖x‖ per point, x the ambient input. (B, d) → (B,)"""
    x = model.ambient(h)
    return (model.inverse(model.encode(h))[0] - x).norm(dim=1) / x.norm(dim=1)


class InnSteerSystem(GeometrySystem):
    """Fits an InnSteer by maximum likelihood with one learned latent mean per class.

    Args:
        model: the flow, its normalisation already fitted on the training activations.
        num_classes: K; classes are the arg-max concept of each point's q.
        lr, weight_decay, warmup_fraction: AdamW with linear warm-up then cosine decay.
        grad_clip: gradient-norm clip, applied by the system (so every trainer honours it).
        noise: std of Gaussian noise added to the standardised training inputs, a smoothing
            regulariser against memorising the few points per class; 0 turns it off.
        centres: "argmax", each point's Gaussian at its arg-max class's mean (docs/method.md §8), or
            "soft", at the q-weighted mean of the class means (`soft_centres`).
        seed: seeds each step's noise together with the step number and rank, so a resumed run draws the same
            noise as an uninterrupted one (None: torch's current seed, which `pipeline.train` sets).
    """

    label = "INNSteer"
    diverged_fix = "Lower optim.lr, clamp or num_blocks"

    def __init__(self, model: InnSteer, num_classes: int, lr: float, weight_decay: float, warmup_fraction: float,
                 grad_clip: float, noise: float = 0.0, centres: str = "argmax", seed: int | None = None):  # fmt: skip
        super().__init__()
        self.model = model
        seed = torch.initial_seed() if seed is None else seed
        self.save_hyperparameters(ignore=["model"])

    def terms(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        s = self.model.standardise(batch["x"])  # (B, D)
        if self.training and self.hparams.noise:
            step = torch.Generator().manual_seed((self.hparams.seed * 1_000_003 + self.global_step) * 1_009 + self.global_rank)
            s = s + self.hparams.noise * torch.randn(s.shape, generator=step).to(s)
        z, log_det = self.model.latent(s)  # (B, D), (B,)
        classes = classes_of(batch["coords"], self.hparams.num_classes)
        soft = self.hparams.centres == "soft"
        loss = nll(z, log_det, soft_centres(batch["coords"], self.model.means) if soft else self.model.means[classes])
        return {
            "loss": loss,
            "nll": loss,
            "nll_per_dim": loss / z.shape[1],
            "log_det_mean": log_det.mean(),
            "log_det_std": log_det.std() if len(log_det) > 1 else log_det.new_zeros(()),
            "class_accuracy": (self.model.classify(z) == classes).float().mean(),
        }

    def training_terms(self, batch):
        return self.terms(batch), len(batch["x"])

    def on_before_optimizer_step(self, optimizer):
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.hparams.grad_clip)
        self.refuse_non_finite(norm, "gradient norm")
        self.log("train/grad_norm", norm, on_step=False, on_epoch=True)

    def validation_terms(self, batch):
        n = len(batch["x"])
        round_trip = round_trip_error(self.model, batch["x"]).max()
        self.log("val/round_trip_max", round_trip, sync_dist=True, reduce_fx="max", batch_size=n)
        return self.terms(batch), n


def linear_probe_accuracy(z_train: torch.Tensor, y_train: np.ndarray, z_val: torch.Tensor, y_val: np.ndarray, seed: int) -> float:
    """Accuracy on val of a multinomial logistic regression fitted on train latents.

    With a single training class (an LM that always gives the same answer) the probe can only predict it.
    """
    if len(np.unique(y_train)) < 2:
        return float((y_val == y_train[0]).mean())
    probe = LogisticRegression(max_iter=2000, random_state=seed).fit(z_train.double().numpy(), y_train)
    return float((probe.predict(z_val.double().numpy()) == y_val).mean())


@torch.no_grad()
def steering_success(model: InnSteer, lm, tokenizer, layer: int, prompts: Sequence[str], classes: np.ndarray,
                     variant_ids, pairs: Sequence[tuple[int, int]], alpha: float, n_carriers: int,
                     seed: int) -> dict[tuple[int, int], float]:  # fmt: skip
    """For each pair (a, b): the fraction of class-a carriers whose arg-max q is b after `steer(h, a, b, alpha)`.

    Carriers are `carrier_rows`' seeded sample of up to `n_carriers` prompts whose own arg-max concept is a,
    the same sampler evaluation uses; the steered h goes into the LM by the one intervention.
    """
    rates: dict[tuple[int, int], float] = {}
    for a in sorted({a for a, _ in pairs}):
        rows = carrier_rows(classes, a, n_carriers, seed)  # never empty: pairs come from classes with training rows
        tail = CarrierTail.of_prompts(lm, tokenizer, layer, [prompts[i] for i in rows])
        targets = torch.tensor([b for x, b in pairs if x == a])  # (T,)
        C = len(rows)
        h = tail.h.float().repeat(len(targets), 1).to(model.means.device)  # (T·C, d), row t·C + c
        steered = model.steer(h, a, targets.repeat_interleave(C).to(model.means.device), alpha)
        q = concept_q(tail, steered.view(len(targets), C, -1), variant_ids)  # (T, C, K+1)
        hit = (q.argmax(-1).cpu() == targets[:, None]).float().mean(1)  # (T,)
        rates.update({(a, int(b)): float(r) for b, r in zip(targets, hit)})
    return rates


# ---- the family ------------------------------------------------------------------------------


@register_family("innsteer")
class InnSteerFamily(Family):
    monitor = "val/nll"  # best checkpoint and early stopping

    def check(self, name: str, g: dict[str, Any]) -> None:
        """Refuse settings that cannot train, naming the fix."""
        if g["target"] != "hellinger":
            raise StageError(
                f"geometry '{name}': INNSteer takes its classes from arg-max q, which it reads from the Hellinger "
                f"targets; set geometry.{name}.target=hellinger (it is {g['target']})."
            )
        missing = [k for k in ("alpha", "carriers", "max_pairs", "all_pairs_max_k") if k not in g["steering"]]
        if missing:
            raise StageError(f"geometry '{name}': steering needs {missing}; see configs/geometry/innsteer.yaml.")
        if g["block"] not in BLOCKS:
            raise StageError(f"geometry '{name}': block={g['block']!r} is not supported; use one of {sorted(BLOCKS)}.")

    def build(self, g: dict[str, Any], d: int, K: int, meta: dict[str, Any], seed: int) -> tuple[InnSteer, dict[str, Any]]:
        """The untrained flow of an INNSteer geometry config and its constructor arguments."""
        ctor = {"input_dim": d, "num_classes": K, "pca_dim": g["pca_dim"], "block": g["block"],
                "num_blocks": g["num_blocks"], "hidden": g["hidden"], "depth": g["depth"], "clamp": g["clamp"],
                "seed": seed}  # fmt: skip
        if ctor["pca_dim"] is not None and not 2 <= ctor["pca_dim"] <= d:
            raise StageError(f"pca_dim={ctor['pca_dim']} must lie in [2, d={d}]; set pca_dim to at most {d}, or null.")
        return InnSteer(**ctor, meta=meta), ctor

    @torch.no_grad()
    def system(self, model: InnSteer, g: dict[str, Any], train: PairwiseTargets, K: int) -> InnSteerSystem:
        """The training system, with each class mean starting at its class's mean latent under the untrained flow."""
        data = train[torch.as_tensor(train.rows)]
        z, classes = model.encode(data["x"]), classes_of(data["coords"], K)  # (N, D), (N,)
        for c in classes.unique():
            model.means[c] = z[classes == c].mean(0)
        return InnSteerSystem(model, K, **g["optim"], noise=g["noise"], centres=g["centres"])

    @torch.no_grad()
    def evaluate(self, cfg: DictConfig, task: Task, g: dict[str, Any], model: InnSteer, train: PairwiseTargets,
                 val: PairwiseTargets, folder: Path) -> dict[str, Any]:  # fmt: skip
        """Round trip, log-det symmetry, class separability on val, and steering success through the LM.

        Draws `folder/training.png`: the latent by class, and the success of every steered pair.
        """
        K, every = len(task.concepts), torch.arange(len(train.labels))
        data = train[every]
        h, classes = data["x"], classes_of(data["coords"], K).numpy()  # (N, d), (N,)
        z, log_det = model(h)
        tr, va = torch.as_tensor(train.rows), torch.as_tensor(val.rows)
        back, inv_log_det = model.inverse(z[va])
        x_val = model.ambient(h[va])
        round_trip = (back - x_val).norm(dim=1) / x_val.norm(dim=1)
        steering = g["steering"]
        # Only classes the LM gives for some training prompt have a learned mean to steer from or to.
        pairs = steering_pairs(np.unique(classes[tr.numpy()]).tolist(), steering["max_pairs"], cfg.seed,
                               steering["all_pairs_max_k"])  # fmt: skip
        rates = lm_steering_success(cfg, task, model, train, classes, pairs, steering["alpha"], steering["carriers"])
        values = np.array(list(rates.values()) or [np.nan])  # NaN: no pair to steer
        if not rates:
            log.warning("%s/INNSteer: the LM answers every training prompt with one class, so no pair can be steered "
                        "and steering success is NaN. Train the LM further (lm.max_steps) or check its accuracy.",
                        task.name)  # fmt: skip
        metrics = {
            "round_trip_max": float(round_trip.max()),
            "round_trip_median": float(round_trip.median()),
            "log_det_symmetry": float((log_det[va] + inv_log_det).abs().max()),
            "val_class_accuracy": float((model.classify(z[va]).numpy() == classes[va.numpy()]).mean()),
            "val_probe_accuracy": linear_probe_accuracy(z[tr], classes[tr.numpy()], z[va], classes[va.numpy()], cfg.seed),
            "steering_alpha": steering["alpha"],
            "steering_pairs": len(rates),
            "steering_success_mean": float(values.mean()),
            "steering_success_min": float(values.min()),
            "steering_pairs_at_least_0.8": float((values >= 0.8).mean()),
            "steering_success": {f"{task.concepts[a]}->{task.concepts[b]}": r for (a, b), r in rates.items()},
            "classes_trained": np.unique(classes[tr.numpy()]).tolist(),  # the classes whose mean μ_c was learned
        }
        figure(task, z, classes, model.means, rates, metrics, folder / "training.png")
        return metrics

    def headline(self, metrics: dict[str, Any]) -> dict[str, float]:
        return rounded(metrics, ("val_probe_accuracy", "steering_success_mean", "steering_success_min"))

    def card(self, ctor: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        m, task = meta["metrics"], meta["task"]
        summary = (f"An INNSteer flow (arXiv 2606.08454; docs/method.md §8 of geosteer). φ, a FrEIA `SequenceINN` of "
                   f"{ctor['num_blocks']} `{ctor['block']}` coupling blocks, maps standardised activations to a latent "
                   f"where each answer class (arg-max q) is a unit Gaussian around a learned mean μ_c. Steering from "
                   f"class a to b is `h' = φ⁻¹(φ(h) + α(μ_b − μ_a))`, a straight line in the latent and a geodesic of "
                   f"the pullback metric `J_φᵀ J_φ`.")  # fmt: skip
        ambient = f"PCA({ctor['pca_dim']}) of h (steering keeps the rest of h)" if ctor["pca_dim"] else "raw h"
        steered = f"steering α={m['steering_alpha']:g}: carriers moved to b, mean / min over {m['steering_pairs']} pairs"
        rows = [("ambient space", ambient), ("subnet", f"{ctor['depth']} hidden layer(s) of {ctor['hidden']}, clamp {ctor['clamp']}"),
                ("round trip ‖φ⁻¹(φ(x)) − x‖/‖x‖ on val, max", f"{m['round_trip_max']:.2e}"),
                ("val linear-probe accuracy (latent)", f"{m['val_probe_accuracy']:.4f}"),
                (steered, f"{m['steering_success_mean']:.3f} / {m['steering_success_min']:.3f}"),
                ("best val NLL", f"{m['best_val']:.4g}")]  # fmt: skip
        usage = f"h_steered = geometry.steer(h, source=a, target=b, alpha=torch.linspace(0, 1, 9))  # (9, B, {ctor['input_dim']})"
        values = list(task["values"])
        learned = [values[k] for k in m.get("classes_trained", range(len(values)))]
        note = (
            f"Class indices follow the task's concepts: {values[:12]}{' …' if len(values) > 12 else ''}. a and b "
            f"must be classes the flow learned a mean for: {learned[:12]}{' …' if len(learned) > 12 else ''}.\n"
        )
        return {"tags": ["innsteer", "normalizing-flow"], "title": f"invertible latent steering of {meta['lm']} on {task['name']}",
                "summary": summary, "rows": rows, "usage": usage, "note": note}  # fmt: skip


def lm_steering_success(cfg: DictConfig, task: Task, model: InnSteer, train: PairwiseTargets, classes: np.ndarray,
                        pairs: list[tuple[int, int]], alpha: float, n_carriers: int) -> dict[tuple[int, int], float]:  # fmt: skip
    """`steering_success` on the LM and prompts the geometry's activations came from."""
    with ActivationStore(train.store_path) as store:
        prompts = store.read(task.name, ["prompt"])["prompt"]
        variant_ids = store.schema(task.name).variant_ids
        lm, tokenizer = lm_of_store(cfg, store.attrs, "INNSteer's steering test")
        layer = int(store.attrs["layer"])  # the store's, not the config's: the activations came from there
    return steering_success(model, lm, tokenizer, layer, prompts, classes, variant_ids, pairs, alpha, n_carriers, cfg.seed)


def figure(task: Task, z: torch.Tensor, classes: np.ndarray, means: torch.Tensor, rates: dict[tuple[int, int], float],
           metrics: dict[str, Any], path: Path) -> None:  # fmt: skip
    """The latent's top-2 principal plane by class with the class means, and the steering success of every pair."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.8))
    centre = z.double().mean(0)
    basis = torch.linalg.svd(z.double() - centre, full_matrices=False).Vh[:2].T  # (D, 2)
    z2, m2 = ((z.double() - centre) @ basis).numpy(), ((means.double() - centre) @ basis).numpy()
    cmap = "twilight" if task.topology == "cyclic" else "viridis"
    sc = ax.scatter(z2[:, 0], z2[:, 1], c=classes, cmap=cmap, s=6, vmin=0, vmax=len(task.concepts) - 1)
    ax.scatter(m2[:, 0], m2[:, 1], c=np.arange(len(m2)), cmap=cmap, s=90, marker="X", edgecolors="k",
               vmin=0, vmax=len(task.concepts) - 1)  # fmt: skip
    fig.colorbar(sc, ax=ax, shrink=0.8, label="class (arg-max q)")
    ax.set(title=f"{task.name} / INNSteer latent (PC 1–2), X = class means",
           xlabel=f"val linear probe {metrics['val_probe_accuracy']:.3f}")  # fmt: skip
    K = len(task.concepts)
    grid = np.full((K, K), np.nan)
    for (a, b), r in rates.items():
        grid[a, b] = r
    im = bx.imshow(grid, vmin=0, vmax=1, cmap="magma")
    fig.colorbar(im, ax=bx, shrink=0.8, label="carriers whose arg-max q becomes b")
    ticks = np.arange(K) if K <= 26 else np.arange(0, K, 10)
    bx.set(xticks=ticks, yticks=ticks, xlabel="target class b", ylabel="source class a",
           title=f"steering α={metrics['steering_alpha']:g}: mean {metrics['steering_success_mean']:.2f}, "
                 f"min {metrics['steering_success_min']:.2f}")  # fmt: skip
    if K <= 12:
        bx.set(xticklabels=[task.concepts[i] for i in ticks], yticklabels=[task.concepts[i] for i in ticks])
        bx.tick_params(axis="x", rotation=60)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
