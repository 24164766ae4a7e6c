"""stage=eval: steer the LM along every method's path, score the behaviour, and compare the learned metrics with G_out.

For each task, class pairs (a → b) (all ordered pairs when K ≤ 12, else a seeded
sample) run between the class centroids of h (mean activation per answer class).
Path methods build T+1 waypoints once per pair; iterative methods step each
carrier's own h until q_b reaches the threshold. Every waypoint goes into 16
seeded carrier prompts of class a in one batched call through `CarrierTail`,
and SPEC §9's metrics are read off q (`models.behaviour`). The learned
geometries are then set against the analytical output metric G_out: their
geodesics against G_out's (surrogate agreement), and their metrics against
G_out's on held-out points in their own prompts (metric alignment).

Everything comes from the activation store, the exported geometries and the LM:
a user with shipped geometry folders and the model can evaluate
(`eval.geometry_dir=<folder>`). Per-task results are kept as they finish, so a
crashed stage resumes with the next task; `pipeline.report` writes the report.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from data.store import ActivationStore
from data.targets import stratified_split
from data.tasks import Task
from models.behaviour import (
    BehaviourManifold,
    arc_length,
    bhattacharyya_energy,
    classes_between,
    first_reaching,
    legibility,
    off_target_kl,
    target_prob_end,
    top1_at_end,
    visit_intermediates,
)
from models.gaga import GAGA
from models.geodesic_bridge import GeodesicBridge
from models.geodesics import PCA, LabelledSpline, lbfgs_geodesic, linear_path
from models.hub import GeometryMismatch, read_config
from models.innsteer import InnSteer
from models.metrics import (
    EncoderPullback,
    FisherPullback,
    OutputPullback,
    effective_dimensionality,
    eigenvalue_scale,
    factor_eigenvalues,
    principal_angles,
    pullback_of,
    quadratic_forms,
    random_directions,
    regularisation,
    spearman,
    spectral_deviation,
    top_eigenspace,
)
from models.steering import caa_direction, dual_direction, fishback_direction, steer, subspace_replace
from models.tail import CarrierTail, log_concept_probs
from pipeline import extract, report
from pipeline.common import (
    StageError,
    atomic_write_text,
    close_logger,
    current_result,
    fingerprint,
    load_tasks,
    lm_of_store,
    log,
    make_logger,
    replace_dir,
    to_plain,
    write_stamp,
)
from pipeline.innsteer import steering_pairs


@dataclass(frozen=True)
class Method:
    label: str
    kind: str  # "path": waypoints between centroids; "iterative": steps from each carrier's own h
    role: str  # "baseline" | "learned" | "target" (G_out, the analytical metric)
    how: str  # how the path is built, for the report


METHODS = {
    "linear": Method("linear", "path", "baseline", "chord between centroids, full replacement"),
    "spline": Method("labelled spline", "path", "baseline", "PCA(64) spline through class centroids, subspace injection"),
    "gaga_out": Method("GAGA-Out + L-BFGS", "path", "learned", "L-BFGS geodesic of G_E (GAGA-Out), full replacement"),
    "gaga_phate": Method("GAGA-PHATE + L-BFGS", "path", "learned", "L-BFGS geodesic of G_E on its PCA(64), subspace injection"),
    "g_out": Method("G_out + L-BFGS", "path", "target", "L-BFGS geodesic of G_out on a pinned canonical carrier"),
    "bridge": Method("GeodesicBridge", "path", "learned", "one forward pass of the bridge"),
    "innsteer": Method("INNSteer", "path", "learned", "φ⁻¹(φ(x_a) + α(μ_b − μ_a)), α ∈ [0, 1]"),
    "caa": Method("CAA", "iterative", "baseline", "unit mean-difference steps of ‖x_b − x_a‖/T to the threshold"),
    "fishback": Method("FishBack", "iterative", "baseline", "natural-gradient steps (G_F + λI)⁻¹∇log q_b to the threshold"),
    "dual": Method("dual steering", "iterative", "baseline", "(Cov_p[g] + αI)⁻¹β steps of ‖x_b − x_a‖/T to the threshold"),
}
# metric → (direction: +1 higher is better, −1 lower is better)
METRICS = {"E_B": -1, "arc_length": -1, "visit_intermediates": 1, "legibility": 1, "target_prob_end": 1, "top1_at_end": 1,
           "reached": 1, "offtarget_kl": -1}  # fmt: skip


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


@dataclass
class Paths:
    """Every pair's path: `points` are injected (raw h, or PCA coordinates with `pca`); `raw` lives in h-space."""

    points: torch.Tensor  # (P, W, D)
    raw: torch.Tensor  # (P, W, d)
    pca: PCA | None = None


def read_task(store: ActivationStore, task: Task, val_fraction: float, seed: int) -> TaskData:
    rows = store.read(task.name, ["h", "q", "label", "prompt"])
    train, val = stratified_split(rows["label"], val_fraction, seed)  # the split stage=targets made
    return TaskData(task, torch.from_numpy(rows["h"]).float(), torch.from_numpy(rows["q"]).double(), rows["label"],
                    rows["prompt"], store.schema(task.name).variant_ids, train, val)  # fmt: skip


def load_geometry(cfg: DictConfig, task: str, method: str, d: int, layer: int):
    """The exported geometry a method steers with, or the reason it is absent."""
    family = {"gaga_out": GAGA, "gaga_phate": GAGA, "bridge": GeodesicBridge, "innsteer": InnSteer}[method]
    folder = Path(cfg.eval.geometry_dir) / task / cfg.eval.geometries[method]
    if not (folder / "config.json").is_file():
        return None, f"no exported geometry at {folder}; train it (pipeline stage=train geometry={cfg.eval.geometries[method]})"
    model = family.from_pretrained(folder).eval()
    try:
        model.check_compatible(d=d, layer=layer)
    except GeometryMismatch as e:
        raise StageError(f"eval: {folder}: {e}") from e
    return model.requires_grad_(False), str(folder)


def carrier_rows(labels: np.ndarray, a: int, n: int, seed: int) -> np.ndarray:
    """A seeded sample of up to n store rows of class a, sorted; the same for every method."""
    rows = np.flatnonzero(labels == a)
    return np.sort(np.random.default_rng([seed, a]).choice(rows, min(n, len(rows)), replace=False))


def canonical_carrier(data: TaskData) -> int:
    """The G_out solve's pinned carrier: the prompt whose h is nearest the task's mean activation."""
    return int((data.h - data.h.mean(0)).norm(dim=1).argmin())


def tail_of(lm, tokenizer, layer: int, prompts) -> CarrierTail:
    enc = tokenizer(list(prompts), padding=True, return_tensors="pt").to(lm.device)
    return CarrierTail(lm, layer, enc.input_ids, enc.attention_mask)


# ---- paths ---------------------------------------------------------------------------------------


def encoder_paths(metric: EncoderPullback, x_a: torch.Tensor, x_b: torch.Tensor, fit_on: torch.Tensor,
                  e: DictConfig) -> torch.Tensor:  # fmt: skip
    """L-BFGS geodesics of G_E = J_Eᵀ J_E + λI, λ at `lam_rel` of its scale on the points `fit_on`. → (P, W, D)"""
    metric.lam = regularisation(metric, fit_on, e.lam_rel)
    return lbfgs_geodesic(x_a, x_b, metric, e.steps, e.lbfgs.max_iter, e.lbfgs.history_size)


def path_of(method: str, data: TaskData, pairs: list[tuple[int, int]], geometry, e: DictConfig, g_out: OutputPullback | None) -> Paths:
    """The waypoints of every pair under one path method. pairs (P,) → Paths with W = steps + 1."""
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    x_a, x_b = data.centroids[a], data.centroids[b]  # (P, d)
    chord = linear_path(x_a, x_b, e.steps)
    fit_on = data.h[data.train[:512]]
    if method == "linear":
        return Paths(chord, chord)
    if method == "spline":
        keep = data.labels >= 0  # rows left out of every class (−1) have no place on the spline
        spline = LabelledSpline(data.h[keep], torch.from_numpy(data.labels[keep]), data.task.topology == "cyclic",
                                e.spline_pca)  # fmt: skip
        w = torch.stack([spline.path(i, j, e.steps) for i, j in pairs]).float()  # (P, W, k)
        pca = PCA(spline.pca.components.float(), spline.pca.mean.float())
        return Paths(w, subspace_replace(chord, w, pca), pca)
    if method == "gaga_out":
        path = encoder_paths(pullback_of(geometry), x_a, x_b, fit_on, e)
        return Paths(path, path)
    if method == "gaga_phate":  # its geodesic lives on its PCA; off the subspace G_E is λI, so the rest follows the chord
        pca = PCA(geometry.pca_components, geometry.pca_mean)
        encode = lambda w: geometry.encoder(geometry.standardise(w))  # noqa: E731  PCA coordinates → latent
        w = encoder_paths(EncoderPullback(encode), pca.project(x_a), pca.project(x_b), pca.project(fit_on), e)
        return Paths(w, subspace_replace(chord, w, pca), pca)
    if method == "g_out":
        path = lbfgs_geodesic(x_a, x_b, g_out, e.steps, e.g_out_max_iter, e.lbfgs.history_size)
        return Paths(path, path)
    if method == "bridge":
        with torch.no_grad():
            path = geometry(x_a, x_b, torch.linspace(0, 1, e.steps + 1))
        return Paths(path, path)
    if method == "innsteer":
        with torch.no_grad():
            alpha = torch.linspace(0, 1, e.steps + 1)
            path = geometry.steer(x_a, torch.tensor(a), torch.tensor(b), alpha).transpose(0, 1)  # (P, W, d)
        return Paths(path, path)
    raise AssertionError(method)


@torch.no_grad()
def innsteer_geodesic(model: InnSteer, x_a: torch.Tensor, x_b: torch.Tensor, steps: int) -> torch.Tensor:
    """The exact geodesic of G_φ: φ⁻¹ of the latent chord (φ's latent is flat). With PCA, the rest follows the chord. → (P, W, d)"""
    z = linear_path(model.encode(x_a), model.encode(x_b), steps)  # (P, W, D)
    a = model.inverse(z.flatten(0, 1))[0].view(z.shape)
    chord = linear_path(x_a, x_b, steps)
    if model.pca_dim is None:
        return a
    return subspace_replace(chord, a, PCA(model.pca_components, model.pca_mean))


# ---- steering and scoring ------------------------------------------------------------------------


@torch.no_grad()
def read_behaviour(tail: CarrierTail, h: torch.Tensor, variant_ids, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q and the off-target KL to the unsteered distribution, at every waypoint of every carrier, one batch.

    h (W, C, d) → q (W, C, K+1), KL (W, C)
    """
    W, C, d = h.shape
    carrier = torch.arange(C, device=h.device).repeat(W)
    logits = tail.logits(h.reshape(W * C, d).to(tail.h.dtype), carrier)  # (W·C, V)
    q = log_concept_probs(logits, variant_ids).exp().double()
    kl = off_target_kl(tail.logits0[:C].double(), logits.view(W, C, -1).double(), list(variant_ids[target]))  # (W, C)
    return q.view(W, C, -1), kl


def score(q: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, a: int, b: int, manifold: BehaviourManifold,
          cyclic: bool, threshold: float) -> dict[str, float]:  # fmt: skip
    """SPEC §9's behaviour metrics of one pair. q (W, C, K+1), kl (W, C), mask (W, C) of the steps taken."""
    last = mask.long().sum(0) - 1  # (C,)
    first = first_reaching(q, b, threshold, mask)
    ok = first >= 0
    return {
        "E_B": float(bhattacharyya_energy(q, manifold, mask)),
        "arc_length": float(arc_length(q, mask)),
        "visit_intermediates": float(visit_intermediates(q, a, b, cyclic, mask)),
        "legibility": float(legibility(q, mask)),
        "target_prob_end": float(target_prob_end(q, b, last)),
        "top1_at_end": float(top1_at_end(q, b, last)),
        "reached": float(ok.double().mean()),
        "offtarget_kl": float(kl[first[ok], ok.nonzero().flatten()].mean()) if ok.any() else math.nan,
    }


def iterative_direction(method: str, tail: CarrierTail, data: TaskData, a: torch.Tensor, b: torch.Tensor, e: DictConfig,
                        unembedding):  # fmt: skip
    """The step direction of an iterative method; a and b (C,) are each tail carrier's source and target class."""
    if method == "caa":
        return caa_direction(data.centroids[a], data.centroids[b])
    if method == "fishback":
        return fishback_direction(tail, data.variant_ids, b, e.fishback.lam, e.fishback.top_k)
    return dual_direction(tail, unembedding, data.variant_ids, a, b, e.dual.alpha, e.dual.top_k)


STEER_ROWS = 1024  # (pair, carrier) rows an iterative method steers in one batch: bounds memory on large vocabularies


def iterate(method: str, tail: CarrierTail, data: TaskData, pairs: list[tuple[int, int]], sizes: list[int],
            e: DictConfig, unembedding) -> list[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """Each pair's iterated steering, many pairs per batch: per pair, h (S+1, C, d) and the steps taken (S+1, C) bool.

    `tail` holds the pairs' carriers one after the other, sizes[p] of pair p; a pair's S is its carriers' most steps.
    """
    bounds = np.cumsum([0, *sizes]).tolist()
    source = torch.tensor([a for (a, _), n in zip(pairs, sizes) for _ in range(n)])  # (R,) per tail carrier
    target = torch.tensor([b for (_, b), n in zip(pairs, sizes) for _ in range(n)])
    direction = iterative_direction(method, tail, data, source, target, e, unembedding)
    out, first = [], 0
    while first < len(pairs):
        end = first + 1  # pairs first … end−1 steer together, up to STEER_ROWS rows
        while end < len(pairs) and bounds[end + 1] - bounds[first] <= STEER_ROWS:
            end += 1
        carrier = torch.arange(bounds[first], bounds[end])
        a, b = source[carrier], target[carrier]
        step = e.fishback.step if method == "fishback" else (data.centroids[b] - data.centroids[a]).norm(dim=1) / e.steps
        traj = steer(tail, carrier, data.variant_ids, b, direction, step, e.threshold, e.max_steps)
        for p in range(first, end):
            rows = slice(bounds[p] - bounds[first], bounds[p + 1] - bounds[first])
            steps = int(traj.last[rows].max()) + 1
            out.append((traj.h[:steps, rows], traj.mask[:steps, rows]))
        first = end
    return out


# ---- one task ------------------------------------------------------------------------------------


def evaluate_task(cfg: DictConfig, data: TaskData, lm, tokenizer, layer: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every method on every pair, and the learned metrics against G_out: (JSON-able results, figure data)."""
    e, task = cfg.eval, data.task
    K, cyclic = len(task.concepts), task.topology == "cyclic"
    pairs = steering_pairs(data.classes, e.max_pairs, cfg.seed, e.all_pairs_max_k)
    q_centroids = torch.stack([data.q[data.labels == k].mean(0) for k in data.classes])  # (K', K+1)
    manifold = BehaviourManifold(q_centroids, cyclic)
    unembedding = lm.get_output_embeddings().weight.detach()
    # Every source class's carriers in one tail; each pair's carriers are a `select` of it, one after the other.
    sources = sorted({a for a, _ in pairs})
    carriers = {a: carrier_rows(data.labels, a, e.carriers, cfg.seed) for a in sources}  # store rows
    base = tail_of(lm, tokenizer, layer, data.prompts[np.concatenate([carriers[a] for a in sources])])
    offset = dict(zip(sources, np.cumsum([0] + [len(carriers[a]) for a in sources]).tolist()))  # a's first in base
    sizes = [len(carriers[a]) for a, _ in pairs]  # carriers per pair (fewer than eval.carriers in a small class)
    pair_tail = base.select(torch.cat([torch.arange(offset[a], offset[a] + len(carriers[a])) for a, _ in pairs]))
    bounds = np.cumsum([0, *sizes]).tolist()  # pair p's carriers are pair_tail's bounds[p] … bounds[p+1]−1

    canon = canonical_carrier(data)
    g_out = None
    if "g_out" in e.methods:  # G_out on the pinned carrier, λ_reg from its scale on training activations
        g_out_tail = tail_of(lm, tokenizer, layer, data.prompts[[canon]])
        g_lam = regularisation(OutputPullback(g_out_tail, data.variant_ids), data.h[data.train[:256]], e.lam_rel)
        g_out = OutputPullback(g_out_tail, data.variant_ids, carrier=0, lam=g_lam, max_batch=1024)

    shown = max(range(len(pairs)), key=lambda p: (len(classes_between(*pairs[p], K, cyclic)), -p))  # the figures' pair
    results: dict[str, Any] = {"task": task.name, "K": K, "concepts": list(task.concepts), "pairs": [list(p) for p in pairs],
                               "carriers": e.carriers, "canonical_carrier": str(data.prompts[canon]), "methods": {}}  # fmt: skip
    figures: dict[str, Any] = {"pair": pairs[shown], "paths": {}, "q": {}}
    raw_paths: dict[str, torch.Tensor] = {}
    geometries: dict[str, Any] = {}
    d = data.h.shape[1]
    for method in e.methods:
        spec = METHODS[method]
        entry: dict[str, Any] = {"label": spec.label, "kind": spec.kind, "role": spec.role, "how": spec.how}
        results["methods"][method] = entry
        geometry = None
        if method in e.geometries:
            geometry, where = load_geometry(cfg, task.name, method, d, layer)
            if geometry is None:
                entry["reason"] = where
                log.warning("%s/%s skipped: %s", task.name, method, where)
                continue
            entry["geometry"], geometries[method] = where, geometry
        start = time.perf_counter()
        per_pair: dict[str, list[float]] = {m: [] for m in METRICS}
        paths, steered = None, None
        if spec.kind == "path":
            log.info("%s/%s: building %d paths", task.name, method, len(pairs))
            paths = path_of(method, data, pairs, geometry, e, g_out)
            raw_paths[method] = paths.raw
        else:
            log.info("%s/%s: steering %d pairs from their carriers' own h", task.name, method, len(pairs))
            steered = iterate(method, pair_tail, data, pairs, sizes, e, unembedding)
        for p, (a, b) in enumerate(tqdm(pairs, desc=f"{task.name}/{method}", leave=False)):
            tail = pair_tail.select(torch.arange(bounds[p], bounds[p + 1]))
            C = len(tail)
            if paths is not None:
                w = paths.points[p].unsqueeze(1).expand(-1, C, -1)  # (W, C, D)
                h = w if paths.pca is None else subspace_replace(tail.h, w, paths.pca)  # each carrier keeps its rest
                mask = torch.ones(h.shape[:2], dtype=torch.bool)
                trace = paths.raw[p]
            else:
                h, mask = steered[p]
                trace = h[:, 0]
            q, kl = read_behaviour(tail, h, data.variant_ids, b)
            for m, v in score(q, kl, mask, a, b, manifold, cyclic, e.threshold).items():
                per_pair[m].append(v)
            if p == shown:
                figures["paths"][method] = trace.float()
                figures["q"][method] = q.mean(1)  # (W, K+1); a carrier that stopped repeats its last q
        entry["seconds"] = round(time.perf_counter() - start, 2)
        entry["per_pair"] = {m: [None if math.isnan(v) else v for v in vs] for m, vs in per_pair.items()}
        log.info("%s/%s: %.1f s", task.name, method, entry["seconds"])

    start = time.perf_counter()
    results["agreement"] = surrogate_agreement(raw_paths, geometries, e)
    results["alignment"], figures["alignment"] = metric_alignment(data, lm, tokenizer, layer, geometries, e, cfg.seed)
    results["alignment"]["seconds"] = round(time.perf_counter() - start, 2)
    return results, figures


def surrogate_agreement(raw_paths: dict[str, torch.Tensor], geometries, e: DictConfig) -> dict[str, Any]:
    """Per pair, mean_t ‖w_t − w_t^{G_out}‖ / ‖x_b − x_a‖ for each learned geometry's geodesic (and the chord, for scale)."""
    if "g_out" not in raw_paths:
        return {"reason": "the G_out method is off (eval.methods), so there is no G_out geodesic to compare with"}
    target = raw_paths["g_out"]
    span = (target[:, -1] - target[:, 0]).norm(dim=1)  # (P,)
    geodesics = {m: raw_paths[m] for m in ("linear", "gaga_out", "gaga_phate", "bridge") if m in raw_paths}
    if "innsteer" in geometries:  # its steering path ends at φ⁻¹(φ(x_a) + μ_b − μ_a); its geodesic ends at x_b
        x_a, x_b = target[:, 0], target[:, -1]
        geodesics["innsteer"] = innsteer_geodesic(geometries["innsteer"], x_a, x_b, e.steps)
    return {m: [float(v) for v in ((path - target).norm(dim=2).mean(1) / span)] for m, path in geodesics.items()}


def metric_alignment(data: TaskData, lm, tokenizer, layer: int, geometries, e: DictConfig, seed: int):
    """Each learned metric against G_out at held-out points, each in its own prompt; FishBack's diagnostics of G_out and G_F."""
    a = e.alignment
    rows = np.sort(np.random.default_rng([seed, 7]).choice(data.val, min(a.points, len(data.val)), replace=False))
    x = data.h[rows]
    tail = tail_of(lm, tokenizer, layer, data.prompts[rows])
    own = torch.arange(len(rows))
    fit_on = data.h[data.train[:256]]
    J_out = OutputPullback(tail, data.variant_ids, carrier=own).jacobian(x)  # (n, K+1, d)
    lam_out = e.lam_rel * eigenvalue_scale(J_out)
    v = random_directions(len(x), a.directions, x.shape[1], torch.Generator().manual_seed(seed), dtype=x.dtype)
    q_out = quadratic_forms(J_out, lam_out, v)  # (n, n_dir)
    K = len(data.task.concepts)
    results: dict[str, Any] = {"points": len(rows), "directions": a.directions}
    scatter: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for method, geometry in geometries.items():
        if method == "bridge":
            results[method] = {"reason": "the bridge has no metric of its own: it draws GAGA-Out's G_E geodesics (see GAGA-Out)"}
            continue
        metric = pullback_of(geometry)
        J = metric.jacobian(x)  # (n, k, d)
        q_g = quadratic_forms(J, regularisation(metric, fit_on, e.lam_rel), v)
        r = min(K, *J.shape[1:])
        angles = principal_angles(top_eigenspace(J, r), top_eigenspace(J_out, r))  # (n, r)
        rho = spearman(q_g, q_out)
        results[method] = {"spearman": rho.tolist(), "angle_deg": angles.rad2deg().mean(1).tolist(),
                           "overlap": angles.cos().pow(2).mean(1).tolist(), "r": r, "chance_overlap": r / x.shape[1]}  # fmt: skip
        scatter[method] = (q_g.flatten().numpy(), q_out.flatten().numpy())
    J_F = FisherPullback(tail, carrier=own, top_k=a.fisher_top_k).jacobian(x)
    for name, J, lam in (("G_out", J_out, lam_out), ("G_F", J_F, e.lam_rel * eigenvalue_scale(J_F))):
        eig = factor_eigenvalues(J, lam)
        results[name] = {"spectral_deviation": spectral_deviation(eig).tolist(), "effective_dim": effective_dimensionality(eig).tolist()}
    return results, scatter


# ---- the stage -----------------------------------------------------------------------------------


def eval_fingerprint(cfg: DictConfig, store_fp: str, tasks: list[Task]) -> str:
    """What the results depend on: the eval config, the store, the geometries' fingerprints, the LM and the seed."""
    used = {}
    for task in tasks:
        for method, name in cfg.eval.geometries.items():
            config = Path(cfg.eval.geometry_dir) / task.name / name / "config.json"
            if method in cfg.eval.methods and config.is_file():
                used[f"{task.name}/{method}"] = read_config(config.parent).get("meta", {}).get("fingerprint")
    return fingerprint({"eval": to_plain(cfg.eval), "store": store_fp, "geometries": used, "tasks": [t.name for t in tasks],
                        "lm": str(cfg.model.pretrained), "layer": cfg.model.layer, "seed": cfg.seed})  # fmt: skip


def run(cfg: DictConfig) -> dict:
    """Evaluate every task; write `<run>/eval/` (report.md, results.json, results.csv, figures)."""
    tasks = load_tasks(cfg)
    unknown = [m for m in cfg.eval.methods if m not in METHODS]
    if unknown:
        raise StageError(f"eval.methods names {unknown}, unknown; use any of {list(METHODS)}.")
    store_path = Path(cfg.paths.run_dir) / "extract" / extract.STORE
    if not store_path.is_file():
        log.info("no activation store at %s: extracting it from the model first", store_path)
        extract.run(cfg)
    with ActivationStore(store_path) as store:
        store_fp, layer = str(store.attrs["fingerprint"]), int(store.attrs["layer"])
        missing = [t.name for t in tasks if t.name not in store.tasks]
        if missing:
            raise StageError(f"the store {store_path} has no {missing}; re-run stage=extract with those tasks.")
        lm, tokenizer = lm_of_store(cfg, store.attrs, tasks[0].name, "evaluation")
        fp = eval_fingerprint(cfg, store_fp, tasks)
        out = Path(cfg.paths.run_dir) / "eval"
        if (done := current_result(out, fp, "the evaluation", cfg.overwrite)) is not None:
            return done
        work = out.with_name(f".eval.partial-{fp}")
        work.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        torch.manual_seed(cfg.seed)
        logger = make_logger(cfg, "eval", run_id_file=work / "run_id")
        per_task = {}
        for task in tasks:
            done_file = work / f"{task.name}.json"
            if done_file.is_file():
                log.info("%s: evaluated before the crash, kept", task.name)
                per_task[task.name] = json.loads(done_file.read_text())
                continue
            data = read_task(store, task, cfg.targets.val_fraction, cfg.seed)
            results, figures = evaluate_task(cfg, data, lm, tokenizer, layer)
            if cfg.eval.figures:
                results["figures"] = report.task_figures(data, results, figures, work)
            atomic_write_text(done_file, json.dumps(results, indent=1))
            per_task[task.name] = results
    summary = report.write(per_task, cfg, work, round(time.perf_counter() - start, 1), METHODS, METRICS)
    report.log_to(logger, work, summary)
    if logger:
        close_logger(logger)
    replace_dir(work, out)
    result = {"dir": str(out), "report": str(out / "report.md"), **summary["headline"], "seconds": summary["seconds"]}
    write_stamp(out, "eval", fp, result)
    log.info("evaluation written to %s", out / "report.md")
    return result
