"""The GeodesicBridge family (docs/method.md §5): the training system, the held-out comparison with L-BFGS, and the
family `bridge` (`pipeline.family`'s contract) that `pipeline.train` calls.

The network is `models.geodesic_bridge.GeodesicBridge`. The metric is G_E = J_EᵀJ_E + λI of a frozen,
trained GAGA encoder E (the config's `encoder`), whose decoder G supplies the on-manifold term. A batch is
a point cloud of B training activations; its two halves are the endpoints of B/2 curves.

    L = Σ_p E_p(γ) / Σ_p E_p(chord)                          energy, relative to the chords of the batch
      + w_dens · mean_t relu(n(γ_t) / n₀ − 1)                density hinge
      + w_man  · mean_t relu(r(γ_t) / max(r₀, r(c_t)) − 1)   on-manifold hinge

E_p(γ) = ∫₀¹ ‖J_E(γ_t) γ̇_t‖² + λ‖γ̇_t‖² dt. n(x) is the mean distance from x to its k nearest training
activations and n₀ its mean over the data (docs/method.md §5's density hinge h₀, in units of h₀).

r(x) = ‖G(E(x̃)) − x̃‖² is GAGA's own reconstruction error (x̃ standardised, as in its L_rec), r₀ its mean
over the data, and c_t the chord at the same t. A point is on the manifold when the autoencoder reconstructs
it as well as the data; between the clusters of a task no path is (along the chords between weekdays'
clusters r averages over 200 r₀), so the hinge there only forbids going further off than the chord. That is what ballooning is,
and the published bridge, which has no such term, does it; this hinge leaves the energy free to bend the
curve anywhere the autoencoder knows at least as well as the straight line. Every term is dimensionless,
so the weights carry over between tasks.

Two estimators of E_p (`energy`), both on a stratified random time grid in training:
- `secant` (default): Σ_i (‖E(γ_{u_{i+1}}) − E(γ_{u_i})‖² + λ‖Δγ_i‖²) / Δu_i, the energy of the latent polyline.
- `jvp`: the mean of ‖J_E γ̇‖² + λ‖γ̇‖², γ̇ by forward-mode jvp in t and J_E γ̇ by one jvp through E. It is
  exact at every point, but a ReLU encoder's J_E is piecewise constant, so the parameter gradient of the
  sampled speed misses what moving the curve into a region of another J_E costs. Trained on it, the bridge's
  energy rises, even on a fixed batch (docs/methods.md, GeodesicBridge). The secant differentiates E itself, which is
  continuous, and sees that cost. Validation logs both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from omegaconf import DictConfig

from geosteer.data.targets import PairwiseTargets, stratified_sample
from geosteer.data.tasks import Task
from geosteer.models.gaga import GAGA
from geosteer.models.geodesic_bridge import (
    GeodesicBridge,
    chord,
    drift,
    knn_mean_distance,
    secant_energy,
    speed_energy,
    stratified_times,
)
from geosteer.models.geodesics import PCA, lbfgs_geodesic, linear_path, path_energy
from geosteer.models.hub import load_geometry, read_config
from geosteer.models.metrics import EncoderPullback, regularisation
from geosteer.pipeline.common import CONFIG_DIR, StageError, timed
from geosteer.pipeline.family import Family, GeometrySystem, register_family, rounded
from geosteer.pipeline.products import RunLayout

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

ESTIMATORS = ("secant", "jvp")


class BridgeSystem(GeometrySystem):
    """Trains a GeodesicBridge against a frozen GAGA encoder (its decoder for the on-manifold term).

    Args:
        bridge: the curve network, its normalisation fitted on the training activations.
        encoder: the trained GAGA whose pullback G_E is the metric; frozen, and kept in eval mode.
        data: the training activations (N, d), for the density hinge, r₀ and drift.
        times: T, the stratified random times per curve in training; validation uses the grid 0, 1/T, …, 1.
        energy: the estimator of E_p, `secant` or `jvp` (module docstring).
        lam: λ of G_E.
        density, manifold: the hinges' weights (0 drops a term).
        knn: k of the density hinge.
        lr, weight_decay, warmup_fraction: AdamW with warm-up then cosine decay.
        seed: seeds each step's time grid together with the step number, so a resumed run draws the same
            times as an uninterrupted one (None: torch's current seed, which `pipeline.train` sets).
    """

    label = "GeodesicBridge"

    def __init__(self, bridge: GeodesicBridge, encoder: GAGA, data: torch.Tensor, times: int = 32,
                 energy: str = "secant", lam: float = 0.0, density: float = 1.0, manifold: float = 1.0,
                 knn: int = 5, lr: float = 1e-3, weight_decay: float = 0.0, warmup_fraction: float = 0.02,
                 seed: int | None = None):  # fmt: skip
        super().__init__()
        if energy not in ESTIMATORS:
            raise ValueError(f"energy={energy!r} is not an estimator; use one of {ESTIMATORS}.")
        self.bridge, self.encoder = bridge, encoder.eval().requires_grad_(False)
        self.register_buffer("data", data)
        seed = torch.initial_seed() if seed is None else seed
        self.save_hyperparameters(ignore=["bridge", "encoder", "data"])
        with torch.no_grad():
            self.n0 = float(knn_mean_distance(data, data, knn, exclude_self=True).mean())
            self.r0 = float(self.reconstruction_error(data).mean())

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen: its BatchNorm keeps the running statistics it was trained with
        return self

    def reconstruction_error(self, x: torch.Tensor) -> torch.Tensor:
        """r(x) = ‖G(E(x̃)) − x̃‖², x̃ the encoder's standardised input. (M, d) → (M,)"""
        s = self.encoder.inputs(x)
        return (self.encoder.decoder(self.encoder.encoder(s)) - s).pow(2).sum(1)

    def energies(self, x_a: torch.Tensor, x_b: torch.Tensor, u: torch.Tensor, estimator: str):
        """E_p of the bridge's curves and of the chords (no gradient), and both at the inner times.

        x_a, x_b (P, d), u (T,) → (P,), (P,), (P, T', d), (P, T', d)
        """
        lam, encode = self.hparams.lam, self.encoder.encode
        if estimator == "secant":
            curve, straight = self.bridge(x_a, x_b, u), chord(x_a, x_b, u)  # (P, T, d)
            with torch.no_grad():
                reference = secant_energy(encode, straight, u, lam)
            return secant_energy(encode, curve, u, lam), reference, curve[:, 1:-1], straight[:, 1:-1]
        inner, dt = 0.5 * (u[1:] + u[:-1]), u.diff()  # the midpoint rule on the grid's intervals
        curve, velocity = self.bridge.velocity(x_a, x_b, inner)  # (P, T−1, d) twice
        straight = chord(x_a, x_b, inner)
        with torch.no_grad():
            reference = speed_energy(encode, straight, (x_b - x_a).unsqueeze(1).expand_as(velocity), lam, dt)
        return speed_energy(encode, curve, velocity, lam, dt), reference, curve, straight

    def terms(self, x_a: torch.Tensor, x_b: torch.Tensor, u: torch.Tensor) -> dict[str, torch.Tensor]:
        hp = self.hparams
        energy, reference, inner, straight = self.energies(x_a, x_b, u, hp.energy)
        terms = {"energy": energy.sum() / reference.sum()}
        flat = inner.reshape(-1, inner.shape[-1])  # (P·T, d)
        if hp.density:
            terms["density"] = torch.relu(knn_mean_distance(flat, self.data, hp.knn) / self.n0 - 1).mean()
        if hp.manifold:
            with torch.no_grad():
                tolerated = self.reconstruction_error(straight.reshape(flat.shape)).clamp_min(max(self.r0, 1e-12))
            terms["manifold"] = torch.relu(self.reconstruction_error(flat) / tolerated - 1).mean()
        terms["loss"] = terms["energy"] + sum(getattr(hp, n) * terms[n] for n in ("density", "manifold") if n in terms)
        return terms

    def training_terms(self, batch):
        x = batch["x"]  # (B, d): the first half are start points, the second half end points
        half = len(x) // 2
        steps = torch.Generator().manual_seed(self.hparams.seed * 1_000_003 + self.global_step)
        terms = self.terms(x[:half], x[half : 2 * half], stratified_times(self.hparams.times, steps, x))
        return {**terms, "gain": self.bridge.gain.detach()}, half

    def validation_terms(self, batch):
        x = batch["x"]
        half = len(x) // 2
        x_a, x_b = x[:half], x[half : 2 * half]
        u = torch.linspace(0, 1, self.hparams.times + 1, dtype=x.dtype, device=x.device)
        terms = self.terms(x_a, x_b, u)
        other = "jvp" if self.hparams.energy == "secant" else "secant"  # the other estimator, as a cross-check
        energy, reference, *_ = self.energies(x_a, x_b, u, other)
        terms[f"energy_{other}"] = energy.sum() / reference.sum()
        terms["drift_median"] = drift(self.bridge(x_a, x_b, u), self.data).median()
        return terms, half


# ---- the family ------------------------------------------------------------------------------


@register_family("bridge")
class BridgeFamily(Family):
    monitor = "val/loss"  # best checkpoint and early stopping
    trains_against = ("encoder",)

    def check(self, name: str, g: dict[str, Any]) -> None:
        """Refuse settings that cannot train, naming the fix."""
        if g["energy"] not in ESTIMATORS:
            raise StageError(
                f"geometry '{name}': energy={g['energy']!r} is unknown; set geometry.{name}.energy to one of {ESTIMATORS}."
            )
        if g["times"] < 2 or g["eval"]["steps"] < 2:
            raise StageError(f"geometry '{name}': times={g['times']} and eval.steps={g['eval']['steps']} must be ≥ 2 "
                             f"(a curve needs interior points); e.g. geometry.{name}.times=32.")  # fmt: skip
        if g["batch_size"] < 4:
            raise StageError(f"geometry '{name}': batch_size={g['batch_size']} gives fewer than 2 curves; use ≥ 4.")

    def needs(self, cfg: DictConfig, task: Task, name: str, g: dict[str, Any]) -> dict[str, Path]:
        """The exported GAGA encoder the bridge trains against: a geometry of this run, or an export folder."""
        # A plain name is a geometry of this run; anything with a folder in it (`/x/y`, `./y`, `~/y`) is an export folder.
        given = str(g["encoder"])
        plain = len(Path(given).parts) == 1 and not given.startswith((".", "~", "/"))
        folder = RunLayout.of(cfg).geometry(task.name, given) if plain else Path(given).expanduser()
        if not (folder / "config.json").is_file():
            known = (CONFIG_DIR / "geometry" / f"{g['encoder']}.yaml").is_file()
            first = (f"Train it first (pipeline stage=train geometry=[{g['encoder']},{name}]), or set"
                     if known else "Set")  # fmt: skip
            raise StageError(
                f"geometry '{name}' trains against the encoder '{g['encoder']}', but {folder} holds no exported geometry. "
                f"{first} geometry.{name}.encoder to a GAGA geometry of this run (e.g. gaga_out) or the path of an "
                f"exported GAGA (with a folder in it: /abs/dir or ./dir)."
            )
        meta = read_config(folder).get("meta", {})
        if meta.get("family") != "gaga" or meta.get("task", {}).get("name") != task.name:
            raise StageError(
                f"geometry '{name}': {folder} is a {meta.get('family')} geometry of task {meta.get('task', {}).get('name')}; "
                f"the bridge needs a GAGA encoder of {task.name} (its decoder gives the on-manifold term), e.g. encoder=gaga_out."
            )
        return {"encoder": folder}

    def build(
        self, g: dict[str, Any], d: int, _K: int, meta: dict[str, Any], _seed: int
    ) -> tuple[GeodesicBridge, dict[str, Any]]:
        """The untrained bridge of a config and its constructor arguments."""
        ctor = {"input_dim": d, "hidden": list(g["hidden"])}
        return GeodesicBridge(**ctor, meta=meta), ctor

    def system(self, model: GeodesicBridge, g: dict[str, Any], train: PairwiseTargets, _K: int) -> BridgeSystem:
        x_train = train[torch.as_tensor(train.rows)]["x"]  # (N_train, d)
        encoder = load_geometry(g["needs"]["encoder"], d=x_train.shape[1], layer=int(train.attrs["layer"]))
        lam = metric_of(encoder, train, g["lam_rel"]).lam
        return BridgeSystem(model, encoder, x_train, times=g["times"], energy=g["energy"], lam=lam, **g["loss"],
                            knn=g["knn"], **g["optim"])  # fmt: skip

    def evaluate(self, cfg: DictConfig, task: Task, g: dict[str, Any], model: GeodesicBridge, train: PairwiseTargets,
                 val: PairwiseTargets, folder: Path) -> dict[str, Any]:  # fmt: skip
        """The bridge against batched L-BFGS under the same G_E, on seeded held-out pairs; draws `folder/training.png`.

        Both paths have `eval.steps` + 1 waypoints and are scored by docs/method.md §5's discrete energy (the one L-BFGS
        minimises) and by drift against the training activations.
        """
        x_train = train[torch.as_tensor(train.rows)]["x"]
        x_val = val[torch.as_tensor(val.rows)]["x"]
        encoder = load_geometry(g["needs"]["encoder"], d=x_train.shape[1], layer=int(train.attrs["layer"]))
        metric = metric_of(encoder, train, g["lam_rel"])
        rng = np.random.default_rng(cfg.seed)
        n = g["eval"]["pairs"]
        a = rng.integers(len(x_val), size=n)
        b = (a + rng.integers(1, len(x_val), size=n)) % len(x_val)  # never a pair of one point
        x_a, x_b, T = x_val[a], x_val[b], g["eval"]["steps"]
        grid = torch.linspace(0, 1, T + 1)
        geodesic, lbfgs_s = timed(lambda: lbfgs_geodesic(x_a, x_b, metric, n_steps=T), repeats=1)
        with torch.no_grad():
            curve, bridge_s = timed(lambda: model(x_a, x_b, grid), repeats=5)
            paths = {"bridge": curve, "lbfgs": geodesic, "chord": linear_path(x_a, x_b, T)}
            energy = {k: path_energy(p, metric) for k, p in paths.items()}  # (n,) each
            gap = {k: drift(p, x_train) for k, p in paths.items()}
        ratio = energy["bridge"] / energy["lbfgs"]
        metrics = {
            "eval_pairs": n,
            "lam": metric.lam,
            "energy_vs_lbfgs_median": float(ratio.median()),
            "energy_vs_lbfgs_mean": float(ratio.mean()),
            "chord_energy_vs_lbfgs_median": float((energy["chord"] / energy["lbfgs"]).median()),
            "drift_median": float(gap["bridge"].median()),
            "drift_median_lbfgs": float(gap["lbfgs"].median()),
            "drift_median_chord": float(gap["chord"].median()),
            "drift_vs_lbfgs": float(gap["bridge"].median() / gap["lbfgs"].median()),
            "bridge_ms_per_pair": 1e3 * bridge_s / n,
            "lbfgs_ms_per_pair": 1e3 * lbfgs_s / n,
        }
        figure(task, model.meta.get("geometry", "bridge"), x_train, train.labels[train.rows], paths, ratio, gap, metrics,
               folder / "training.png")  # fmt: skip
        return metrics

    def headline(self, metrics: dict[str, Any]) -> dict[str, float]:
        return rounded(metrics, ("energy_vs_lbfgs_median", "drift_vs_lbfgs"))

    def card(self, ctor: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        m, task, enc = meta["metrics"], meta["task"], meta["needs"]["encoder"]
        summary = (f"A GeodesicBridge. One forward pass gives the curve between two activations, γ(t; x_a, x_b) = (1−t)x_a + t x_b + 4t(1−t)·s·σ⊙MLP, approximating "
                   f"the geodesic of the pullback metric G_E of the GAGA encoder `{enc['geometry']}` (fingerprint "
                   f"`{enc['fingerprint']}`), and kept on the data by a density and an on-manifold hinge.")  # fmt: skip
        rows = [("energy ÷ L-BFGS geodesic's, median", f"{m['energy_vs_lbfgs_median']:.3f}"),
                ("chord energy ÷ L-BFGS's, median", f"{m['chord_energy_vs_lbfgs_median']:.3f}"),
                ("drift (max gap to the data ÷ chord), median", f"{m['drift_median']:.3f} (L-BFGS "
                 f"{m['drift_median_lbfgs']:.3f}, chord {m['drift_median_chord']:.3f})"),
                ("ms per pair, bridge / L-BFGS", f"{m['bridge_ms_per_pair']:.3g} / {m['lbfgs_ms_per_pair']:.3g}"),
                ("hidden widths", str(ctor["hidden"]))]  # fmt: skip
        usage = (f"path = geometry(x_a, x_b, torch.linspace(0, 1, 17))  # x_a, x_b: (P, {ctor['input_dim']}) → "
                 f"(P, 17, {ctor['input_dim']})")  # fmt: skip
        return {
            "tags": ["geodesic-bridge"],
            "title": f"amortised geodesics of {meta['lm']} on {task['name']}",
            "summary": summary,
            "rows": rows,
            "usage": usage,
            "header": f"held-out pairs ({m['eval_pairs']})",
        }


def metric_of(encoder: GAGA, train: PairwiseTargets, lam_rel: float) -> EncoderPullback:
    """G_E with λ_reg = lam_rel × its eigenvalue scale over a class-stratified sample of 512 training activations
    (seed 0: training and the held-out comparison fit the same λ)."""
    rows = stratified_sample(train.labels, np.asarray(train.rows), 512, seed=0)
    x = train[torch.as_tensor(rows)]["x"]
    return EncoderPullback(encoder.encode, regularisation(EncoderPullback(encoder.encode), x, lam_rel))


def figure(task: Task, name: str, x_train: torch.Tensor, labels: np.ndarray, paths: dict[str, torch.Tensor],
           ratio: torch.Tensor, gap: dict[str, torch.Tensor], metrics: dict[str, Any], path: Path,
           shown: int = 6) -> None:  # fmt: skip
    """Curves of a few held-out pairs on the activations' PCA-2 over the data cloud; per-pair energy and drift."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 5))
    pca = PCA.fit(x_train.double(), 2)
    cloud = pca.project(x_train.double()).numpy()
    cmap = "twilight" if task.topology == "cyclic" else "viridis"
    sc = ax.scatter(cloud[:, 0], cloud[:, 1], c=labels, cmap=cmap, s=5, alpha=0.5)
    fig.colorbar(sc, ax=ax, shrink=0.8, label="answer class")
    styles = {"chord": dict(color="0.5", ls="--", lw=1), "lbfgs": dict(color="k", lw=1.2), "bridge": dict(color="C3", lw=2)}
    names = {"chord": "chord", "lbfgs": "L-BFGS geodesic", "bridge": name}
    for kind, style in styles.items():
        for i, p in enumerate(paths[kind][:shown]):
            w = pca.project(p.double()).numpy()
            ax.plot(w[:, 0], w[:, 1], label=names[kind] if i == 0 else None, **style)
    ax.set(title=f"{task.name}: held-out pairs on the activations' PC 1–2", xlabel="PC 1", ylabel="PC 2")
    ax.legend(loc="best", fontsize=8)
    bx.scatter(gap["lbfgs"].numpy(), gap["bridge"].numpy(), c=ratio.numpy(), cmap="coolwarm", vmin=0.75, vmax=1.25, s=18)
    lim = float(max(gap["lbfgs"].max(), gap["bridge"].max())) * 1.05
    bx.plot([0, lim], [0, lim], "k--", lw=0.8)
    bx.plot([0, lim], [0, 1.5 * lim], ":", color="0.4", lw=0.8, label="1.5 × L-BFGS")
    fig.colorbar(bx.collections[0], ax=bx, shrink=0.8, label="energy, bridge ÷ L-BFGS")
    bx.set(xlabel="drift of the L-BFGS geodesic", ylabel=f"drift of {name}", xlim=(0, lim), ylim=(0, lim),
           title=f"energy ÷ L-BFGS: median {metrics['energy_vs_lbfgs_median']:.3f}; drift ÷ L-BFGS "
                 f"{metrics['drift_vs_lbfgs']:.2f}")  # fmt: skip
    bx.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
