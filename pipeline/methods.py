"""Steering methods: one contract and one registry (docs/method.md §5–§9).

A method is one class registered here by name plus one YAML in `configs/method/`, whose keys are the
class's constructor arguments; `method=[linear,caa]` picks methods, and an unknown name is refused before
any work. Two kinds share the contract:
- path methods build T+1 waypoints between the class centroids of every pair at once (`paths`);
- iterative methods step each carrier's own h along `direction` by `step` until q_b reaches the threshold.

A method that steers with a trained geometry names its family (`family`) and its YAML names the export
(`geometry`); evaluation loads it from `<eval.geometry_dir>/<task>/<geometry>/`. The report takes each
method's label, role ("baseline", "learned" or "target") and description from here, and each score's
direction and title from `SCORES`.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from geosteer.data.targets import stratified_sample
from geosteer.data.tasks import Task
from geosteer.models.geodesics import PCA, LabelledSpline, lbfgs_geodesic, linear_path, secant_geodesic, sphere_angle, subdivide
from geosteer.models.innsteer import InnSteer
from geosteer.models.metrics import (
    FIT_ROWS,
    EncoderPullback,
    OutputPullback,
    pullback_of,
    recorded_scale,
    regularisation,
    scaled_lam,
)
from geosteer.models.steering import caa_direction, dual_direction, fishback_direction, gradient_direction, subspace_replace
from geosteer.models.tail import CarrierTail
from geosteer.pipeline.common import CONFIG_DIR, StageError, to_plain


@dataclass(frozen=True)
class Score:
    direction: int  # +1: higher is better; −1: lower is better
    title: str


SCORES = {
    "E_B": Score(-1, "Bhattacharyya energy E_B (lower: closer to the behaviour manifold)"),
    "E_B_ds": Score(-1, "Bhattacharyya energy over arc length ∫ D_B ds (lower; free of how the waypoints are spread)"),
    "arc_length": Score(-1, "Hellinger arc length of the behaviour path (lower: more direct)"),
    "visit_intermediates": Score(1, "Visit-intermediates (higher: passes the classes between a and b)"),
    "legibility": Score(1, "Legibility top-1 (higher: fewer waypoints answer 'other')"),
    "target_prob_end": Score(1, "target_prob_end (higher)"),
    "top1_at_end": Score(1, "top-1@end (higher)"),
    "q_b_budget": Score(1, "q_b where each carrier's own path has gone its Hellinger distance to b (higher: heads for b)"),
    "top1_budget": Score(1, "top-1 = b at that point (higher)"),
    "reached": Score(1, "Carriers whose q_b reached the threshold (higher)"),
    "offtarget_kl": Score(-1, "Off-target KL at matched target probability (lower: less collateral change)"),
}


@dataclass
class TaskData:
    """One task's rows of the activation store, and what every method shares."""

    task: Task
    h: torch.Tensor  # (N, d)
    q: torch.Tensor  # (N, K+1)
    labels: np.ndarray  # (N,) answer class
    prompts: np.ndarray  # (N,)
    variant_ids: list[list[int]]
    train: np.ndarray  # store rows of the seeded split the geometries trained on
    val: np.ndarray
    centroids: torch.Tensor = field(init=False)  # (K, d) mean h per answer class (NaN for a class with no rows)

    def __post_init__(self) -> None:
        K = len(self.task.concepts)
        self.centroids = torch.stack([self.h[self.labels == k].mean(0) for k in range(K)])

    @property
    def classes(self) -> list[int]:
        return sorted(set(self.labels[self.labels >= 0].tolist()))  # −1: a row left out of every class

    def ends(self, pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The centroids of each pair's source and target class. → (P, d), (P, d)"""
        return self.centroids[[a for a, _ in pairs]], self.centroids[[b for _, b in pairs]]

    def canonical_carrier(self) -> int:
        """The G_out solve's pinned carrier: the prompt whose h is nearest the task's mean activation."""
        return int((self.h - self.h.mean(0)).norm(dim=1).argmin())


@dataclass
class Context:
    """What a method may use on one task: its data, the shared evaluation settings and the LM."""

    data: TaskData
    e: DictConfig  # eval settings: steps, lam_rel, lbfgs, threshold, max_steps, …
    lm: Any
    tokenizer: Any
    layer: int
    seed: int

    @property
    def unembedding(self) -> torch.Tensor:
        return self.lm.get_output_embeddings().weight.detach()  # (V, d)


@dataclass
class Paths:
    """Every pair's path: `points` are injected (raw h, or PCA coordinates with `pca`); `raw` lives in h-space.
    `info`: JSON-able facts of the solve, kept in the results beside the method's scores."""

    points: torch.Tensor  # (P, W, D)
    raw: torch.Tensor  # (P, W, d)
    pca: PCA | None = None
    info: dict[str, Any] | None = None


Direction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (h (n, d), carrier (n,)) → unit directions (n, d)


class SteeringMethod(Protocol):
    """The contract. A path method defines `paths`; an iterative method defines `direction` and `step`."""

    label: ClassVar[str]
    kind: ClassVar[str]  # "path" | "iterative"
    role: ClassVar[str]  # "baseline" | "learned" | "target" (G_out, the analytical metric)
    how: ClassVar[str]  # how the path is built, for the report: `{field}` stands for the method's setting (`described`)
    family: ClassVar[str | None]  # the geometry family it steers with; then its YAML names the export
    metric_label: ClassVar[str | None]  # its geometry's metric in the metric alignment (None: none of its own)
    compared: ClassVar[bool]  # a path method whose path is set against G_out's geodesic


class PathMethod:
    """A path method. One that steers with a trained geometry (a `family`) has a field `geometry`, the export's name."""

    kind = "path"

    def paths(self, ctx: Context, pairs: list[tuple[int, int]], geometry) -> Paths:
        raise NotImplementedError

    def geodesic(self, raw: torch.Tensor, geometry, x_a: torch.Tensor, x_b: torch.Tensor, steps: int) -> torch.Tensor | None:
        """The geodesic it stands for between x_a and x_b (P, d), given its raw paths (P, W, d); None: not compared."""
        return raw if self.compared else None


class IterativeMethod:
    """An iterative method; by default its steps are ‖x_b − x_a‖/T."""

    kind = "iterative"

    def direction(self, ctx: Context, tail: CarrierTail, source: torch.Tensor, target: torch.Tensor) -> Direction:
        raise NotImplementedError

    def step(self, ctx: Context, source: torch.Tensor, target: torch.Tensor) -> float | torch.Tensor:
        """Step length per row, for rows of source and target classes (n,)."""
        return (ctx.data.centroids[target] - ctx.data.centroids[source]).norm(dim=1) / ctx.e.steps


def described(method: SteeringMethod) -> str:
    """How `method` builds its path, with its own settings (`how`'s `{field}`s filled in)."""

    def text(value: Any) -> str:
        if isinstance(value, (list, tuple)):
            return ", ".join(map(str, value)) or "none"
        return "null" if value is None else str(value)  # as the YAML writes it

    settings = fields(method) if is_dataclass(method) else ()
    return method.how.format_map({f.name: text(getattr(method, f.name)) for f in settings})


METHODS: dict[str, type] = {}
ROLES = ("baseline", "learned", "target")  # the report's best baseline is chosen among the baselines


def register_method(name: str, *, label: str, role: str, how: str, family: str | None = None,
                    metric_label: str | None = None, compared: bool = False):  # fmt: skip
    """Class decorator: the method `method=[…, name]` selects, built from `configs/method/<name>.yaml`.

    The keywords are the contract's facts for the report (`SteeringMethod`); `compared`: a path method whose raw
    path is a geodesic to set against G_out's (surrogate agreement).
    """

    if role not in ROLES:
        raise ValueError(f"method {name!r} has role={role!r}; use one of {ROLES}.")
    if name in METHODS:
        raise ValueError(f"a method named {name!r} is registered already ({METHODS[name].__qualname__}); pick another name.")

    def add(cls: type) -> type:
        if not issubclass(cls, (PathMethod, IterativeMethod)):
            raise TypeError(f"method {name!r}: {cls.__qualname__} must subclass PathMethod or IterativeMethod.")
        if family is not None and not issubclass(cls, PathMethod):
            raise TypeError(f"method {name!r}: only a path method steers with a trained geometry (family={family!r}).")
        settings = {f.name for f in fields(cls)} if is_dataclass(cls) else set()
        if unknown := {f for _, f, _, _ in string.Formatter().parse(how) if f is not None} - settings:
            raise ValueError(f"method {name!r}: how={how!r} names {sorted(unknown)}, not settings of {cls.__qualname__} "
                             f"({sorted(settings)}); a {{field}} stands for a setting (write {{{{ }}}} for a brace).")  # fmt: skip
        cls.label, cls.role, cls.how = label, role, how
        cls.family, cls.metric_label, cls.compared = family, metric_label, compared
        METHODS[name] = cls
        return cls

    return add


def build_methods(selected: Any) -> dict[str, SteeringMethod]:
    """The selected methods (name → settings), built; an unknown name or setting is refused, naming the choices."""
    selected = to_plain(selected) or {}
    if not selected:
        raise StageError("no steering method selected; pick one or more, e.g. method=[linear,gaga_out,caa].")
    unknown = [name for name in selected if name not in METHODS]
    if unknown:
        raise StageError(f"method names {unknown}, unknown; use any of {sorted(METHODS)}, e.g. method=[linear,caa].")
    built = {}
    for name, settings in selected.items():
        try:
            built[name] = METHODS[name](**(settings or {}))
        except TypeError as e:
            raise StageError(f"method.{name}: {e}; its settings are in configs/method/{name}.yaml.") from e
        method = built[name]
        if method.family is None:
            continue
        if not getattr(method, "geometry", None):
            raise StageError(f"method.{name} steers with a {method.family} geometry but names none; set "
                             f"method.{name}.geometry to the export's name (configs/method/{name}.yaml).")  # fmt: skip
        yaml_file = CONFIG_DIR / "method" / f"{name}.yaml"
        if method.geometry != ((OmegaConf.load(yaml_file).get("geometry") if yaml_file.is_file() else None) or method.geometry):
            method.label = f"{method.label} (export {method.geometry})"  # not the export its YAML names: labels say so
            method.metric_label = method.metric_label and f"{method.metric_label} (export {method.geometry})"
    return built


def encoder_paths(ctx: Context, metric: EncoderPullback, x_a: torch.Tensor, x_b: torch.Tensor, fit_on: torch.Tensor,
                  geometry: Any = None) -> torch.Tensor:  # fmt: skip
    """L-BFGS geodesics of G_E = J_Eᵀ J_E + λI, λ at `lam_rel` of its scale: the one the geometry's export records
    (taken on the same training rows at export: steering uses it too), else its scale on the points `fit_on`. → (P, W, D)"""
    e = ctx.e
    scale = recorded_scale(geometry)
    metric.lam = scaled_lam(e.lam_rel, scale) if scale is not None else regularisation(metric, fit_on, e.lam_rel)
    return lbfgs_geodesic(x_a, x_b, metric, e.steps, e.lbfgs.max_iter, e.lbfgs.history_size)


def fit_on(ctx: Context, n: int = FIT_ROWS) -> torch.Tensor:
    """The training activations λ_reg is fitted on: a class-stratified sample of the training split. (≤ n, d)"""
    return ctx.data.h[stratified_sample(ctx.data.labels, ctx.data.train, n, ctx.seed)]


# ---- the built-in methods ------------------------------------------------------------------------


@register_method("linear", label="linear", role="baseline", how="chord between centroids, full replacement", compared=True)
class Linear(PathMethod):
    def paths(self, ctx, pairs, geometry):
        chord = linear_path(*ctx.data.ends(pairs), ctx.e.steps)
        return Paths(chord, chord)


@register_method(
    "spline",
    label="labelled spline",
    role="baseline",
    how="PCA({pca}) spline through class centroids (k at most min(N, d)), subspace injection",
)
@dataclass
class Spline(PathMethod):
    pca: int  # k of the PCA(k) the spline lives in

    def paths(self, ctx, pairs, geometry):
        return spline_paths(ctx, pairs, self.pca)


def spline_paths(ctx: Context, pairs: list[tuple[int, int]], k: int) -> Paths:
    """The labelled spline through the class centroids of PCA(k) activations, injected by subspace replacement."""
    data = ctx.data
    keep = data.labels >= 0  # rows left out of every class (−1) have no place on the spline
    spline = LabelledSpline(data.h[keep], torch.from_numpy(data.labels[keep]), data.task.topology == "cyclic", k)
    w = torch.stack([spline.path(i, j, ctx.e.steps) for i, j in pairs]).float()  # (P, W, k)
    pca = PCA(spline.pca.components.float(), spline.pca.mean.float())
    return Paths(w, subspace_replace(linear_path(*data.ends(pairs), ctx.e.steps), w, pca), pca)


@register_method("gaga_out", label="GAGA-Out + L-BFGS", role="learned", how="L-BFGS geodesic of G_E (GAGA-Out), full replacement",
                 family="gaga", metric_label="GAGA-Out G_E", compared=True)  # fmt: skip
@dataclass
class GagaOut(PathMethod):
    geometry: str  # the export it steers with

    def paths(self, ctx, pairs, geometry):
        path = encoder_paths(ctx, pullback_of(geometry), *ctx.data.ends(pairs), fit_on(ctx), geometry)
        return Paths(path, path)


@register_method("gaga_jac", label="GAGA-Jac + L-BFGS", role="learned",
                 how="L-BFGS geodesic of G_E (GAGA-Jac, its pullback fitted to G_out), full replacement",
                 family="gaga", metric_label="GAGA-Jac G_E", compared=True)  # fmt: skip
class GagaJac(GagaOut):
    """GAGA-Out's steering with GAGA-Jac's metric."""


@register_method("gaga_phate", label="GAGA-PHATE + L-BFGS", role="learned", how="L-BFGS geodesic of G_E in its export's PCA (in h when its pca_dim is null), subspace injection",
                 family="gaga", metric_label="GAGA-PHATE G_E", compared=True)  # fmt: skip
@dataclass
class GagaPhate(PathMethod):
    geometry: str

    def paths(self, ctx, pairs, geometry):
        """Its geodesic lives on its PCA; off the subspace G_E is λI, so the rest follows the chord. A GAGA without a
        PCA (`pca_dim: null`) steers in h itself, as GAGA-Out does."""
        x_a, x_b = ctx.data.ends(pairs)
        if geometry.pca_dim is None:
            path = encoder_paths(ctx, pullback_of(geometry), x_a, x_b, fit_on(ctx), geometry)
            return Paths(path, path)
        pca = PCA(geometry.pca_components, geometry.pca_mean)
        metric = EncoderPullback(lambda w: geometry.encoder(geometry.standardise(w)))  # PCA coordinates → latent
        w = encoder_paths(ctx, metric, pca.project(x_a), pca.project(x_b), pca.project(fit_on(ctx)), geometry)
        return Paths(w, subspace_replace(linear_path(x_a, x_b, ctx.e.steps), w, pca), pca)


@register_method("g_out", label="G_out geodesic", role="target",
                 how="minimiser of the exact secant energy of √q on a pinned canonical carrier, the best of the chord and "
                     "the starts: {starts} (the spline in PCA({spline_pca}))")  # fmt: skip
@dataclass
class GOut(PathMethod):
    starts: list[str]  # besides the chord: "spline" (the labelled spline's path) and/or "great circle"
    spline_pca: int  # k of the spline start's PCA(k)
    max_batch: int  # points per pass through the LM's tail

    def __post_init__(self) -> None:  # refused when the methods are built, before any work
        unknown = set(self.starts) - {"spline", "great circle"}
        if unknown:
            raise StageError(f"method.g_out.starts has {sorted(unknown)}; use any of ['spline', 'great circle'].")

    def paths(self, ctx, pairs, geometry):
        """`secant_geodesic` of √q on the pinned carrier, λ_reg at `lam_rel` of G_out's scale on training activations,
        with the L-BFGS budget of every other metric (docs/method.md §6)."""
        data, e = ctx.data, ctx.e
        tail = CarrierTail.of_prompts(ctx.lm, ctx.tokenizer, ctx.layer, data.prompts[[data.canonical_carrier()]])
        g_out = OutputPullback(tail, data.variant_ids, carrier=0, max_batch=self.max_batch)
        lam = regularisation(g_out, fit_on(ctx, 256), e.lam_rel)
        x_a, x_b = data.ends(pairs)
        starts = {"spline": spline_paths(ctx, pairs, self.spline_pca).raw} if "spline" in self.starts else {}
        max_iter = e.lbfgs.max_iter if e.max_iter_cap is None else min(e.lbfgs.max_iter, e.max_iter_cap)
        solved = secant_geodesic(x_a, x_b, g_out.sqrt_q, e.steps, max_iter, e.lbfgs.history_size, lam=lam, starts=starts,
                                 great_circle="great circle" in self.starts, max_batch=self.max_batch)  # fmt: skip
        with torch.no_grad():
            lengths = {"geodesic": hellinger_length(solved.paths, g_out.sqrt_q, self.max_batch),
                       "chord": hellinger_length(linear_path(x_a, x_b, e.steps), g_out.sqrt_q, self.max_batch)}  # fmt: skip
            ends = g_out.sqrt_q(torch.cat([x_a, x_b])).view(2, len(pairs), -1)
        bound = sphere_angle(ends[0], ends[1]) / 2**0.5  # the great circle's Hellinger length
        info = {"start": solved.start, "energy": solved.energy.tolist(), "lam": lam, "great_circle": bound.tolist(),
                **{f"length_{k}": v.tolist() for k, v in lengths.items()}}  # fmt: skip
        return Paths(solved.paths, solved.paths, info=info)


def hellinger_length(paths: torch.Tensor, sqrt_q, max_batch: int, between: int = 8) -> torch.Tensor:
    """The Hellinger arc length Σ∠(√q_i, √q_{i+1})/√2 along each path, its segments each cut into `between`
    straight pieces in h, so that a path cannot look short by jumping between waypoints. By the sphere's triangle
    inequality it is never below the great circle's ∠(√q_a, √q_b)/√2. (P, W, d) → (P,)"""
    fine = subdivide(paths, between)  # (P, between·(W−1)+1, d)
    P, W, d = fine.shape
    flat = fine.reshape(-1, d)
    s = torch.cat([sqrt_q(flat[i : i + max_batch], i) for i in range(0, len(flat), max_batch)]).view(P, W, -1)
    return sphere_angle(s[:, 1:], s[:, :-1]).sum(1) / 2**0.5


@register_method(
    "bridge", label="GeodesicBridge", role="learned", how="one forward pass of the bridge", family="bridge", compared=True
)
@dataclass
class Bridge(PathMethod):
    geometry: str

    @torch.no_grad()
    def paths(self, ctx, pairs, geometry):
        path = geometry(*ctx.data.ends(pairs), torch.linspace(0, 1, ctx.e.steps + 1))
        return Paths(path, path)


@register_method(
    "innsteer",
    label="INNSteer",
    role="learned",
    how="φ⁻¹(φ(x_a) + α(μ_b − μ_a)), α ∈ [0, 1]",
    family="innsteer",
    metric_label="INNSteer G_φ",
)
@dataclass
class InnSteerMethod(PathMethod):
    geometry: str

    @torch.no_grad()
    def paths(self, ctx, pairs, geometry):
        """The flow's path of each pair; NaN (no path) for a pair with a class the flow learned no mean for."""
        ok = [p for p, (a, b) in enumerate(pairs) if geometry.learned(a, b)]
        x_a = ctx.data.ends(pairs)[0]
        path = torch.full((len(pairs), ctx.e.steps + 1, x_a.shape[1]), math.nan, dtype=x_a.dtype)  # (P, W, d)
        if ok:
            a, b = torch.tensor([pairs[p][0] for p in ok]), torch.tensor([pairs[p][1] for p in ok])
            path[ok] = geometry.steer(x_a[ok], a, b, torch.linspace(0, 1, ctx.e.steps + 1)).transpose(0, 1)
        unlearned = sorted({c for p in pairs for c in p} - set(geometry.known_classes))
        info = {"left_out": f"the flow learned no latent mean for {[ctx.data.task.concepts[c] for c in unlearned]} "
                            f"(no training prompt's arg-max q was one of them)"} if unlearned else {}  # fmt: skip
        return Paths(path, path, info=info)

    def geodesic(self, raw, geometry: InnSteer, x_a, x_b, steps):
        return geometry.geodesic(x_a, x_b, steps)  # its steering path ends at φ⁻¹(φ(x_a) + μ_b − μ_a), not at x_b


@register_method("caa", label="CAA", role="baseline", how="unit mean-difference steps of ‖x_b − x_a‖/T to the threshold")
class CAA(IterativeMethod):
    def direction(self, ctx, tail, source, target):
        return caa_direction(ctx.data.centroids[source], ctx.data.centroids[target])


@register_method(
    "gradient",
    label="gradient",
    role="baseline",
    how="unit Euclidean gradient steps on log q_b of ‖x_b − x_a‖/T to the threshold",
)
class Gradient(IterativeMethod):
    def direction(self, ctx, tail, source, target):
        return gradient_direction(tail, ctx.data.variant_ids, target)


@register_method(
    "fishback",
    label="FishBack",
    role="baseline",
    how="natural-gradient steps (G_F + λI)⁻¹∇log q_b of {step_length} in the G_F norm (λ = {lam}, top_k = {top_k}) to the threshold",
)
@dataclass
class FishBack(IterativeMethod):
    step_length: float  # of each step in the G_F norm (≈ Fisher–Rao distance)
    lam: float
    top_k: int | None  # the most probable tokens in each step's G_F (None: the whole vocabulary)

    def direction(self, ctx, tail, source, target):
        return fishback_direction(tail, ctx.data.variant_ids, target, self.lam, self.top_k)

    def step(self, ctx, source, target):
        return self.step_length


@register_method(
    "dual",
    label="dual steering",
    role="baseline",
    how="(Cov_p[g] + αI)⁻¹β steps of ‖x_b − x_a‖/T (α = {alpha}, top_k = {top_k}) to the threshold",
)
@dataclass
class Dual(IterativeMethod):
    alpha: float
    top_k: int

    def direction(self, ctx, tail, source, target):
        return dual_direction(tail, ctx.unembedding, ctx.data.variant_ids, source, target, self.alpha, self.top_k)
