"""stage=eval: steer the LM along every method's path, score the behaviour, and compare the learned metrics with G_out.

For each task, class pairs (a → b) (all ordered pairs when K ≤ 12, else a seeded
sample) run between the class centroids of h (mean activation per answer class).
Path methods build T+1 waypoints once per pair; iterative methods step each
carrier's own h until q_b reaches the threshold. Every waypoint goes into 16
seeded carrier prompts of class a in one batched call through `CarrierTail`,
and docs/method.md §9's metrics are read off q (`models.behaviour`). The learned
geometries are then set against the analytical output metric G_out: their
geodesics against G_out's (surrogate agreement), and their metrics against
G_out's on held-out points in their own prompts (metric alignment).

Everything comes from the activation store, the exported geometries and the LM:
a user with shipped geometry folders and the model can evaluate
(`eval.geometry_dir=<folder>`). Per-task results are kept as they finish, so a
crashed stage resumes with the next task; `pipeline.report` writes the report.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm import tqdm

from geosteer.data.store import ActivationStore
from geosteer.data.targets import stratified_split
from geosteer.data.tasks import Task
from geosteer.models.behaviour import (
    BehaviourManifold,
    arc_energy,
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
from geosteer.models.geodesics import linear_path, secant_energy, sphere_angle, subdivide
from geosteer.models.hub import content_digest, load_geometry, strict_json
from geosteer.models.metrics import (
    FisherPullback,
    OutputPullback,
    centred_gram_cosine,
    effective_dimensionality,
    effective_rank,
    factor_eigenvalues,
    pullback_of,
    random_rotation,
    spearman,
    spectral_deviation,
    trace_share,
)
from geosteer.models.steering import carrier_rows, intervene, steer, steering_pairs, subspace_replace
from geosteer.models.tail import CarrierTail, log_concept_probs
from geosteer.pipeline import extract, report
from geosteer.pipeline.common import (
    StageError,
    atomic_write_text,
    close_logger,
    lm_of_store,
    load_tasks,
    log,
    make_logger,
    store_lm,
    to_plain,
)
from geosteer.pipeline.figures import task_figures
from geosteer.pipeline.methods import SCORES, Context, SteeringMethod, TaskData, build_methods, described
from geosteer.pipeline.products import (
    RunLayout,
    check_inside,
    check_product,
    check_provenance,
    current_result,
    drop_leftovers,
    finish_replace,
    in_run,
    lm_source,
    refuse_unrecorded,
    replace_dir,
    stage_fingerprint,
    warn_stale_needs,
    warn_unapplied,
    write_stamp,
)
from geosteer.pipeline.targets import split_key
from geosteer.pipeline.train import capped


def read_task(store: ActivationStore, task: Task, val_fraction: float, seed: int) -> TaskData:
    rows = store.read(task.name, ["h", "q", "label", "prompt"])
    train, val = stratified_split(rows["label"], val_fraction, seed)  # the split stage=targets made
    return TaskData(task, torch.from_numpy(rows["h"]).float(), torch.from_numpy(rows["q"]).double(), rows["label"],
                    rows["prompt"], store.schema(task.name).variant_ids, train, val)  # fmt: skip


def geometry_of(cfg: DictConfig, task: Task, method: SteeringMethod, d: int, store: dict[str, Any], split: str):
    """The exported geometry a method steers with (checked against the task and the store), or why it is absent."""
    folder = Path(cfg.eval.geometry_dir) / task.name / method.geometry  # a method with a family names its export
    if not (folder / "config.json").is_file():
        own = Path(cfg.eval.geometry_dir).resolve() == RunLayout.of(cfg).geometries.resolve()
        fix = (f"train it (pipeline stage=train geometry=[{method.geometry}])" if own else
               f"train it in the run eval.geometry_dir={cfg.eval.geometry_dir} belongs to, or copy an export there")  # fmt: skip
        return None, f"no exported geometry at {in_run(folder, RunLayout.of(cfg).root)}; {fix}"
    check_product(folder, f"Train it again (`pipeline stage=train geometry=[{method.geometry}]`), or copy it again.")
    model = load_geometry(folder, d=d, layer=int(store["layer"]))
    check_provenance(folder, model.meta, task.to_dict(), str(store["model_name"]), str(store.get("lm_fingerprint", "")),
                     int(store["layer"]), str(store["fingerprint"]), split,
                     lm_source(store.get("model_pretrained", ""), store.get("model_revision")))  # fmt: skip
    check_export_name(folder, model.meta, method)
    if model.family != method.family:
        raise StageError(f"eval: {folder} holds a {model.family} geometry; {method.label} steers with a {method.family} one. "
                         f"Point its method YAML's `geometry` at a {method.family} export.")  # fmt: skip
    return model, in_run(folder, RunLayout.of(cfg).root)  # as results.json records it


def check_export_name(folder: Path, meta: dict[str, Any], method: SteeringMethod) -> None:
    """Refuse an export in the folder of another name than the one it was trained as (folders renamed or swapped)."""
    if meta.get("geometry") != method.geometry:
        raise StageError(
            f"eval: {folder} holds the geometry trained as '{meta.get('geometry')}' (its config.json), but "
            f"{method.label} steers with '{method.geometry}': export folders were renamed or swapped. Move each export "
            f"to the folder of the name it was trained as, or train '{method.geometry}' (`pipeline stage=train`)."
        )


HOW_IT_WENT = ("digest", "metrics", "git_sha")  # an export's facts that steering does not depend on (timings vary)
# but one: a GAGA's metrics.metric_scale, which λ_reg of its geodesics is taken from (`exports_used` adds it)


def exports_used(cfg: DictConfig, tasks: list[Task], methods: dict[str, SteeringMethod]) -> dict[str, str]:
    """`<task>/<method>` → the digest of the export it steers with (its weights and config.json, less HOW_IT_WENT:
    the same config trained again is the same export), for every export present in
    `eval.geometry_dir`; each is loaded and checked against its record and its folder's name first. Refuses a geometry_dir
    that holds none of them while learned methods are asked for and it is not this run's own (a run folder given
    for its geometry folder, say): the report would silently hold the baselines alone."""
    root, used, learned = Path(cfg.eval.geometry_dir), {}, []
    for task in tasks:
        for name, method in methods.items():
            if method.family is None:
                continue
            folder = root / task.name / method.geometry
            learned.append(f"{task.name}/{method.geometry}")
            if (folder / "config.json").is_file():
                check_product(folder, f"Train it again (`pipeline stage=train geometry=[{method.geometry}]`).")
                if (g := (to_plain(cfg.get("geometry")) or {}).get(method.geometry)) is not None:
                    warn_unapplied(folder, {"geometry": capped(cfg, g)}, "stage=eval", "To train it with them: "
                                   "`pipeline stage=train overwrite=true` (then eval).", cfg.paths.run_dir)  # fmt: skip
                meta = load_geometry(folder).meta  # loads: a damaged one is named first
                check_export_name(folder, meta, method)
                warn_stale_needs(folder, meta, "stage=eval")
                used[f"{task.name}/{name}"] = content_digest(folder, leave_out=HOW_IT_WENT)
                if (scale := (meta.get("metrics") or {}).get("metric_scale")) is not None:  # λ_reg's scale: it does
                    used[f"{task.name}/{name}"] += f" metric_scale={scale!r}"
    if learned and not used and root.resolve() != RunLayout.of(cfg).geometries.resolve():
        inner = root / "geometry"
        hint = f"eval.geometry_dir={inner} (its geometry folder)" if inner.is_dir() else "a run's geometry folder"
        raise StageError(
            f"eval.geometry_dir={cfg.eval.geometry_dir} holds none of the exports the learned methods steer with "
            f"({', '.join(learned[:4])}{', ...' if len(learned) > 4 else ''}: <task>/<name>/config.json). Point it at "
            f"{hint}, or choose only baselines with method=[...]."
        )
    return used


# ---- steering and scoring ------------------------------------------------------------------------


@dataclass
class Carriers:
    """Every pair's carriers in one tail, one pair after the other: pair p's are rows bounds[p] … bounds[p+1]−1."""

    tail: CarrierTail
    sizes: list[int]  # carriers per pair (fewer than eval.carriers in a small class)

    @property
    def bounds(self) -> list[int]:
        return np.cumsum([0, *self.sizes]).tolist()

    def of(self, p: int) -> CarrierTail:
        return self.tail.select(torch.arange(self.bounds[p], self.bounds[p + 1]))


def pair_carriers(ctx: Context, pairs: list[tuple[int, int]], n: int, seed: int) -> Carriers:
    """Every source class's carriers run once through the LM; each pair's are a `select` of them."""
    data = ctx.data
    sources = sorted({a for a, _ in pairs})
    rows = {a: carrier_rows(data.labels, a, n, seed) for a in sources}  # store rows
    base = CarrierTail.of_prompts(ctx.lm, ctx.tokenizer, ctx.layer, data.prompts[np.concatenate([rows[a] for a in sources])])
    offset = dict(zip(sources, np.cumsum([0] + [len(rows[a]) for a in sources]).tolist()))  # a's first in base
    tail = base.select(torch.cat([torch.arange(offset[a], offset[a] + len(rows[a])) for a, _ in pairs]))
    return Carriers(tail, [len(rows[a]) for a, _ in pairs])


@torch.no_grad()
def read_behaviour(tail: CarrierTail, h: torch.Tensor, variant_ids, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q and the off-target KL to the unsteered distribution, at every waypoint of every carrier, one batch.

    h (W, C, d) → q (W, C, K+1), KL (W, C)
    """
    W, C, _ = h.shape
    logits = intervene(tail, h)  # (W, C, V)
    q = log_concept_probs(logits.flatten(0, 1), variant_ids).exp().double()
    kl = off_target_kl(tail.logits0[:C].double(), logits.double(), list(variant_ids[target]))  # (W, C)
    return q.view(W, C, -1), kl


def score(q: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, a: int, b: int, manifold: BehaviourManifold,
          cyclic: bool, threshold: float) -> dict[str, float]:  # fmt: skip
    """docs/method.md §9's behaviour metrics of one pair. q (W, C, K+1), kl (W, C), mask (W, C) of the steps taken."""
    last = mask.long().sum(0) - 1  # (C,)
    first = first_reaching(q, b, threshold, mask)
    ok = first >= 0
    return {
        "E_B": float(bhattacharyya_energy(q, manifold, mask)),
        "E_B_ds": float(arc_energy(q, manifold, mask)),
        "arc_length": float(arc_length(q, mask)),
        "visit_intermediates": float(visit_intermediates(q, a, b, cyclic, mask)),
        "legibility": float(legibility(q, mask)),
        "target_prob_end": float(target_prob_end(q, b, last)),
        "top1_at_end": float(top1_at_end(q, b, last)),
        "reached": float(ok.double().mean()),
        "offtarget_kl": float(kl[first[ok], ok.nonzero().flatten()].mean()) if ok.any() else math.nan,
    }


def at_budget(tail: CarrierTail, raw: torch.Tensor, variant_ids, b: int, target: torch.Tensor,
              between: int) -> dict[str, float]:  # fmt: skip
    """A path moved onto each carrier's own h (h_c + w_t − w_0) and walked until its Hellinger arc length reaches the
    carrier's own distance to class b's mean output, ∠(√q_c, √q̄_b)/√2, where the great circle would arrive; its
    segments cut into `between` straight pieces in h, as `hellinger_length` does. Methods whose paths share their
    endpoints thus stop apart (docs/method.md §9). q_b and top-1 = b there, means over carriers (the path's end when
    it is shorter than the budget). raw (W, d), target q̄_b (K+1,)"""
    fine = subdivide(raw, between)  # (F, d)
    h = tail.h + (fine - fine[0]).unsqueeze(1)  # (F, C, d)
    F, C, _ = h.shape
    with torch.no_grad():
        s = (0.5 * log_concept_probs(intervene(tail, h).flatten(0, 1), variant_ids)).exp().double().view(F, C, -1)
    walked = torch.cat([s.new_zeros(1, C), sphere_angle(s[1:], s[:-1]).cumsum(0)]) / 2**0.5  # (F, C)
    budget = sphere_angle(s[0], target.sqrt()) / 2**0.5  # (C,)
    stop = (walked < budget).sum(0).clamp(max=F - 1)  # the first point whose walked length reaches the budget
    q = s[stop, torch.arange(C)].pow(2)  # (C, K+1)
    return {"q_b_budget": float(q[:, b].mean()), "top1_budget": float((q.argmax(1) == b).double().mean())}


STEER_ROWS = 1024  # (pair, carrier) rows an iterative method steers in one batch: bounds memory on large vocabularies


def iterate(ctx: Context, method: SteeringMethod, carriers: Carriers,
            pairs: list[tuple[int, int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """Each pair's iterated steering, many pairs per batch: per pair, h (S+1, C, d) and the steps taken (S+1, C) bool.

    A pair's S is its carriers' most steps.
    """
    bounds, e = carriers.bounds, ctx.e
    source = torch.tensor([a for (a, _), n in zip(pairs, carriers.sizes) for _ in range(n)])  # (R,) per tail carrier
    target = torch.tensor([b for (_, b), n in zip(pairs, carriers.sizes) for _ in range(n)])
    direction = method.direction(ctx, carriers.tail, source, target)
    out, first = [], 0
    while first < len(pairs):
        end = first + 1  # pairs first … end−1 steer together, up to STEER_ROWS rows
        while end < len(pairs) and bounds[end + 1] - bounds[first] <= STEER_ROWS:
            end += 1
        carrier = torch.arange(bounds[first], bounds[end])
        a, b = source[carrier], target[carrier]
        traj = steer(carriers.tail, carrier, ctx.data.variant_ids, b, direction, method.step(ctx, a, b), e.threshold,
                     e.max_steps)  # fmt: skip
        for p in range(first, end):
            rows = slice(bounds[p] - bounds[first], bounds[p + 1] - bounds[first])
            steps = int(traj.last[rows].max()) + 1
            out.append((traj.h[:steps, rows], traj.mask[:steps, rows]))
        first = end
    return out


def steered(ctx: Context, method: SteeringMethod, pairs: list[tuple[int, int]], carriers: Carriers, geometry):
    """Each pair's steered h on its carriers (W, C, d), the steps taken (W, C) and the path drawn (W, d); and a
    path method's `Paths`."""
    if method.kind == "iterative":
        return ((h, mask, h[:, 0]) for h, mask in iterate(ctx, method, carriers, pairs)), None
    paths = method.paths(ctx, pairs, geometry)

    def each():
        for p in range(len(pairs)):
            tail = carriers.of(p)
            w = paths.points[p].unsqueeze(1).expand(-1, len(tail), -1)  # (W, C, D)
            h = w if paths.pca is None else subspace_replace(tail.h, w, paths.pca)  # each carrier keeps its rest
            yield h, torch.ones(h.shape[:2], dtype=torch.bool), paths.raw[p]

    return each(), paths


# ---- one task ------------------------------------------------------------------------------------


def evaluate_task(cfg: DictConfig, data: TaskData, methods: dict[str, SteeringMethod], lm, tokenizer,
                  store: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """Every method on every pair, and the learned metrics against G_out: (JSON-able results, figure data).

    `store` is the activation store's attributes (its LM, layer and fingerprint), which every geometry must match.
    """
    layer = int(store["layer"])
    e, task, ctx = cfg.eval, data.task, Context(data, cfg.eval, lm, tokenizer, layer, cfg.seed)
    K, cyclic = len(task.concepts), task.topology == "cyclic"
    pairs = steering_pairs(data.classes, e.max_pairs, cfg.seed, e.all_pairs_max_k)
    class_q = {k: data.q[data.labels == k].mean(0) for k in data.classes}  # (K+1,) each
    manifold = BehaviourManifold(torch.stack(list(class_q.values())), cyclic)
    carriers = pair_carriers(ctx, pairs, e.carriers, cfg.seed)
    shown = max(range(len(pairs)), key=lambda p: (len(classes_between(*pairs[p], K, cyclic)), -p))  # the figures' pair
    results: dict[str, Any] = {"task": task.name, "K": K, "concepts": list(task.concepts), "pairs": [list(p) for p in pairs],
                               "carriers": e.carriers, "carriers_per_pair": carriers.sizes, "canonical_carrier": str(data.prompts[data.canonical_carrier()]),
                               "methods": {}}  # fmt: skip
    figures: dict[str, Any] = {"pair": pairs[shown], "paths": {}, "q": {}}
    raw_paths: dict[str, torch.Tensor] = {}
    geometries: dict[str, Any] = {}
    for name, method in methods.items():
        entry: dict[str, Any] = {"label": method.label, "kind": method.kind, "role": method.role, "how": described(method)}
        results["methods"][name] = entry
        geometry = None
        if method.family is not None:
            geometry, where = geometry_of(
                cfg, task, method, data.h.shape[1], store, split_key(data.labels, cfg.targets.val_fraction, cfg.seed)
            )
            if geometry is None:
                entry["reason"] = where
                log.warning("%s/%s skipped: %s", task.name, name, where)
                continue
            entry["geometry"], geometries[name] = where, geometry
        start = time.perf_counter()
        log.info("%s/%s: steering %d pairs", task.name, name, len(pairs))
        per_pair: dict[str, list[float]] = {m: [] for m in SCORES}
        broken, no_path = 0, 0  # pairs whose outputs went non-finite; pairs the method has no path for
        each, paths = steered(ctx, method, pairs, carriers, geometry)
        if paths is not None:
            raw_paths[name] = paths.raw
            if paths.info:
                entry["solve"] = paths.info
        for p, ((a, b), (h, mask, trace)) in enumerate(tqdm(zip(pairs, each), total=len(pairs), desc=f"{task.name}/{name}",
                                                            leave=False)):  # fmt: skip
            if paths is not None and not bool(paths.raw[p].isfinite().all()):  # no path: `Paths.info["left_out"]` says why
                no_path += 1
                for m in SCORES:
                    per_pair[m].append(math.nan)
                continue
            q, kl = read_behaviour(carriers.of(p), h, data.variant_ids, b)
            if bool(q[mask].isfinite().all()):
                scores = score(q, kl, mask, a, b, manifold, cyclic, e.threshold)
                if method.kind == "path":
                    scores |= at_budget(carriers.of(p), trace.float(), data.variant_ids, b, class_q[b], e.budget_between)
            else:  # an overflow (e.g. in float16): no score, rather than a wrong one
                broken, scores = broken + 1, {}
            for m in SCORES:
                per_pair[m].append(scores.get(m, math.nan))
            if p == shown:
                figures["paths"][name] = trace.float()
                figures["q"][name] = q.mean(1)  # (W, K+1); a carrier that stopped repeats its last q
        entry["seconds"] = round(time.perf_counter() - start, 2)
        entry["per_pair"] = {m: [None if math.isnan(v) else v for v in vs] for m, vs in per_pair.items()}
        if no_path:
            entry["no_path_pairs"] = no_path
            log.warning("%s/%s: %d of %d pairs have no path and are left out of its scores: %s", task.name, name,
                        no_path, len(pairs), (paths.info or {}).get("left_out", "the method gave none"))  # fmt: skip
        if broken:
            entry["non_finite_pairs"] = broken
            log.warning("%s/%s: %d of %d pairs gave non-finite output probabilities (NaN or Inf) and are left out of its "
                        "scores; with model.dtype=%s the arithmetic may overflow: use float32 (or bfloat16)", task.name,
                        name, broken, len(pairs), cfg.model.dtype)  # fmt: skip
        log.info("%s/%s: %.1f s", task.name, name, entry["seconds"])

    start = time.perf_counter()
    results["own_point"] = own_point(ctx, methods, geometries, pairs)
    results["own_point"]["seconds"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    results["agreement"], results["energy"] = against_g_out(ctx, methods, raw_paths, geometries)
    results["alignment"], figures["alignment"] = metric_alignment(ctx, methods, geometries, cfg.seed)
    figures["metric_labels"] = {m: methods[m].metric_label for m in figures["alignment"]}
    results["alignment"]["seconds"] = round(time.perf_counter() - start, 2)
    return results, figures


def against_g_out(ctx: Context, methods: dict[str, SteeringMethod], raw_paths: dict[str, torch.Tensor],
                  geometries) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    """Each compared method's geodesic against G_out's, per pair (docs/method.md §9), and the chord for scale:
    - agreement: mean_t ‖w_t − w_t^{G_out}‖ / ‖x_b − x_a‖;
    - energy: its secant energy under G_out (Σ‖√q(w_{t+1}) − √q(w_t)‖² on the pinned carrier) ÷ the G_out geodesic's:
      1 is as low as G_out's own geodesic; the chord's ratio is the scale."""
    target = next((raw_paths[m] for m, method in methods.items() if method.role == "target" and m in raw_paths), None)
    if target is None:
        reason = {
            "reason": "the G_out method is off (method=[…] leaves out g_out), so there is no G_out geodesic to compare with"
        }
        return reason, reason
    span = (target[:, -1] - target[:, 0]).norm(dim=1)  # (P,)
    x_a, x_b = target[:, 0], target[:, -1]
    geodesics = {m: method.geodesic(paths, geometries.get(m), x_a, x_b, ctx.e.steps) for m, method in methods.items()
                 if method.kind == "path" and (paths := raw_paths.get(m)) is not None}  # fmt: skip
    geodesics = {m: path for m, path in geodesics.items() if path is not None}
    data = ctx.data
    tail = CarrierTail.of_prompts(ctx.lm, ctx.tokenizer, ctx.layer, data.prompts[[data.canonical_carrier()]])
    sqrt_q = OutputPullback(tail, data.variant_ids, carrier=0).sqrt_q
    with torch.no_grad():
        floor = secant_energy(target, sqrt_q)  # (P,)
        energy = {m: (secant_energy(path, sqrt_q) / floor).tolist() for m, path in geodesics.items()}
        energy.setdefault("linear", (secant_energy(linear_path(x_a, x_b, ctx.e.steps), sqrt_q) / floor).tolist())
    agreement = {m: [float(v) for v in ((path - target).norm(dim=2).mean(1) / span)] for m, path in geodesics.items()}
    return agreement, energy


def own_point(ctx: Context, methods: dict[str, SteeringMethod], geometries, pairs: list[tuple[int, int]]) -> dict[str, Any]:
    """INNSteer's protocol (docs/method.md §8): every carrier of class a (up to `own_point.max_carriers`) steered from its
    own h, by INNSteer's rule φ⁻¹(φ(h) + α(μ_b − μ_a)) and by CAA's h + α(μ_b − μ_a), at every α of the grid.

    Per method, α, pair: carriers whose top-1 is b, the carriers, mean q_b, mean |argmax − b| (classes; the shorter
    way round on a cyclic task; carriers answering "other" left out), their share, and the mean off-target KL. The
    report picks α on one half of the pairs and scores it on the other (`report.own_point_rows`)."""
    e, data = ctx.e, ctx.data
    rule = next((m for m, g in geometries.items() if methods[m].family == "innsteer"), None)
    if rule is None:
        return {"reason": "no INNSteer geometry is evaluated (method=[…] leaves out innsteer, or it is not exported)"}
    # pairs with a class the flow learned no mean for are left out
    if not (pairs := [(a, b) for a, b in pairs if geometries[rule].learned(a, b)]):
        return {"reason": "the INNSteer flow learned a latent mean for no pair's two classes (no training prompt's "
                          "arg-max q was one of them), as for its paths"}  # fmt: skip
    K, cyclic = len(data.task.concepts), data.task.topology == "cyclic"
    alphas = torch.tensor(e.own_point.alphas, dtype=data.h.dtype)
    carriers = pair_carriers(ctx, pairs, e.own_point.max_carriers, ctx.seed)
    steer_by = {
        rule: lambda h, a, b: geometries[rule].steer(h, a, b, alphas),
        "caa": lambda h, a, b: h + alphas.view(-1, 1, 1) * (data.centroids[b] - data.centroids[a]),
    }  # (C, d) → (A, C, d)
    keys = ("top1", "carriers", "q_b", "distance", "other", "kl")
    out: dict[str, Any] = {"alphas": alphas.tolist(), "pairs": [list(p) for p in pairs], "methods": {}}
    for name, move in steer_by.items():
        per = {k: [] for k in keys}  # per pair: one value per α
        for p, (a, b) in enumerate(pairs):
            tail = carriers.of(p)
            with torch.no_grad():
                q, kl = read_behaviour(tail, move(tail.h, a, b), data.variant_ids, b)  # (A, C, K+1), (A, C)
            top = q.argmax(-1)  # (A, C)
            gap = (top - b).abs()
            gap = torch.minimum(gap, K - gap) if cyclic else gap
            concept = top < K
            per["top1"].append((top == b).sum(1).tolist())
            per["carriers"].append(len(tail))
            per["q_b"].append(q[..., b].mean(1).tolist())
            per["distance"].append([float(g[c].double().mean()) if c.any() else None for g, c in zip(gap, concept)])
            per["other"].append((~concept).double().mean(1).tolist())
            per["kl"].append(kl.double().mean(1).tolist())
        out["methods"][name] = {"label": methods[name].label if name in methods else "CAA", **per}
    return out


def metric_alignment(ctx: Context, methods: dict[str, SteeringMethod], geometries, seed: int):
    """Each learned metric against G_out at held-out points, each in its own prompt (docs/method.md §9), calibrated:
    the ceiling is G_out at the same points under another prompt, the floor a random rotation of the metric.
    FishBack's diagnostics of G_out and G_F beside them. λ_reg plays no part: every measure is blind to λI."""
    data, a = ctx.data, ctx.e.alignment
    rows = np.sort(np.random.default_rng([seed, 7]).choice(data.val, min(a.points, len(data.val)), replace=False))
    x = data.h[rows]
    tail = CarrierTail.of_prompts(ctx.lm, ctx.tokenizer, ctx.layer, data.prompts[rows])
    n = len(rows)
    J_out = OutputPullback(tail, data.variant_ids, carrier=torch.arange(n)).jacobian(x).double()  # (n, K+1, d)
    other = OutputPullback(tail, data.variant_ids, carrier=torch.arange(n).roll(1)).jacobian(x).double()
    v = tangent_directions(data, rows, a.neighbours)  # (n, m, d) towards other classes
    q_out = (J_out @ v.transpose(1, 2)).pow(2).sum(1)  # (n, m) vᵀG_out v
    results: dict[str, Any] = {"points": n, "directions": v.shape[1],
                               "ceiling": centred_gram_cosine(other, J_out).tolist()}  # fmt: skip
    scatter: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    generator = torch.Generator().manual_seed(seed)
    for name, geometry in geometries.items():
        if methods[name].metric_label is None:
            results[name] = {"reason": "the bridge has no metric of its own: it draws GAGA-Out's G_E geodesics (see GAGA-Out)"}
            continue
        J = pullback_of(geometry).jacobian(x).double()  # (n, k, d)
        q_g = (J @ v.transpose(1, 2)).pow(2).sum(1)
        results[name] = compare_metrics(J, J_out, generator) | {"spearman": spearman(q_g, q_out).tolist()}
        scatter[name] = (q_g.flatten().numpy(), q_out.flatten().numpy())
    J_F = FisherPullback(tail, carrier=torch.arange(n), top_k=a.fisher_top_k).jacobian(x)
    for name, J in (("G_out", J_out), ("G_F", J_F)):
        eig = factor_eigenvalues(J, 0.0)
        results[name] = {"spectral_deviation": spectral_deviation(eig, effective_rank(J)).tolist(),
                         "effective_dim": effective_dimensionality(eig).tolist()}  # fmt: skip
    return results, scatter


def compare_metrics(J: torch.Tensor, J_out: torch.Tensor, generator: torch.Generator) -> dict[str, Any]:
    """A metric G = JᵀJ against G_out = J_outᵀJ_out at the same points (n, ·, d), per point: their centred Gram cosine,
    its floor (G turned by a random rotation: the same spectrum, no relation), and the share of each metric's trace in
    the other's top eigenspace at its effective rank r, with chance r/d."""
    d = J.shape[-1]
    turned = torch.stack([j @ random_rotation(d, generator) for j in J])  # (n, k, d): UᵀGU, U Haar
    r_g, r_out = effective_rank(J), effective_rank(J_out)
    return {
        "gram_cosine": centred_gram_cosine(J, J_out).tolist(),
        "floor": centred_gram_cosine(turned, J_out).tolist(),
        "share_of_G_out": trace_share(J, J_out, r_g).tolist(),  # G_out's trace in G's top r_g directions
        "chance_of_G_out": float((r_g / d).mean()),
        "share_of_G": trace_share(J_out, J, r_out).tolist(),
        "chance_of_G": float((r_out / d).mean()),
        "rank": float(r_g.double().mean()),
        "rank_out": float(r_out.double().mean()),
    }


def tangent_directions(data: TaskData, rows: np.ndarray, neighbours: int) -> torch.Tensor:
    """Unit directions from each point towards the other classes: their centroids and the point's `neighbours`
    nearest training activations of another class. (n, K−1 + neighbours, d) in float64"""
    x = data.h[rows].double()
    centroids = data.centroids.double()
    train = torch.as_tensor(data.train)
    h_train, l_train = data.h[train].double(), torch.as_tensor(data.labels[train])
    out = []
    for i, row in enumerate(rows):
        own = int(data.labels[row])
        towards = [centroids[k] for k in range(len(centroids)) if k != own and torch.isfinite(centroids[k]).all()]
        others = h_train[l_train != own]
        near = others[(others - x[i]).norm(dim=1).topk(min(neighbours, len(others)), largest=False).indices]
        v = torch.cat([torch.stack(towards), near]) - x[i]
        out.append(v / v.norm(dim=1, keepdim=True).clamp_min(1e-12))
    m = min(len(v) for v in out)  # the same for every point unless a class has fewer training rows than `neighbours`
    return torch.stack([v[:m] for v in out])


# ---- the stage -----------------------------------------------------------------------------------


def eval_fingerprint(cfg: DictConfig, store_fp: str, tasks: list[Task], methods: dict[str, SteeringMethod]) -> str:
    """What the results depend on: the eval and method configs, the store (and so the LM and layer), the content of
    every export used (not where it lies: `eval.geometry_dir` itself is left out) and the seed."""
    evaluation = {k: v for k, v in to_plain(cfg.eval).items() if k != "geometry_dir"}
    return stage_fingerprint({"eval": evaluation, "method": to_plain(cfg.method), "store": store_fp,
                        "geometries": exports_used(cfg, tasks, methods), "tasks": [t.name for t in tasks],
                        "seed": cfg.seed, "val_fraction": cfg.targets.val_fraction}, run_dir=cfg.paths.run_dir)  # fmt: skip


FINISHED = "finished.json"  # in an unfinished evaluation's folder: each evaluated task → the SHA-256 of its files


def read_finished(work: Path) -> dict[str, str]:
    try:
        finished = json.loads((work / FINISHED).read_text())
    except (OSError, ValueError):
        return {}
    return finished if isinstance(finished, dict) else {}


def task_digest(work: Path, task: str) -> str | None:
    """The SHA-256 of `task`'s results in `work` and of every figure they list; None when one is missing or unreadable."""
    try:
        text = (work / f"{task}.json").read_bytes()
        figures = json.loads(text).get("figures", {})
        digest = hashlib.sha256(text)
        for name in sorted(figures.values()):
            digest.update(hashlib.sha256((work / name).read_bytes()).digest())
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    return digest.hexdigest()


def resumed(work: Path, task: Task, finished: dict[str, str]) -> dict | None:
    """`task`'s results as an evaluation that crashed wrote them, or None: none saved, or not those it wrote (its
    results or figures edited, torn, missing or another task's), which are then evaluated again."""
    done_file = work / f"{task.name}.json"
    if not done_file.is_file():
        return None
    if (digest := task_digest(work, task.name)) is None or finished.get(task.name) != digest:
        log.warning("%s or its figures are not as the crashed evaluation wrote them: evaluating %s again",
                    done_file, task.name)  # fmt: skip
        return None
    log.info("%s: evaluated before the crash, kept", task.name)
    return json.loads(done_file.read_text())


def fit_top_k(methods: dict[str, SteeringMethod], vocab: int) -> None:
    """A method's `top_k` above the LM's vocabulary comes to the whole vocabulary: it is set so, with a warning, and
    the report describes the method with the number of tokens it used."""
    for name, method in methods.items():
        if isinstance(k := getattr(method, "top_k", None), int) and k > vocab:
            log.warning("method.%s.top_k=%d is more tokens than the LM has (%d): it takes all %d", name, k, vocab, vocab)
            method.top_k = vocab


def run(cfg: DictConfig) -> dict:
    """Evaluate every task; write `<run>/eval/` (report.md, results.json, results.csv, figures)."""
    tasks = load_tasks(cfg)
    methods = build_methods(cfg.get("method"))  # an unknown method is refused before any work
    run = RunLayout.of(cfg)
    if not Path(cfg.eval.geometry_dir).is_dir() and Path(cfg.eval.geometry_dir).resolve() != run.geometries.resolve():
        raise StageError(
            f"eval.geometry_dir={cfg.eval.geometry_dir} is not a folder. Point it at a run's geometry folder "
            f"(<run>/geometry, holding <task>/<name>/ exports), or leave it at its default, this run's."
        )
    store_path = run.store
    if not store_path.is_file():
        log.info("no activation store at %s: extracting it from the model first", store_path)
        extract.run(cfg)
    check_product(
        run.extract,
        "Re-run `pipeline stage=extract` with the overrides that made it (the same tasks=..., model=...): it makes the store again.",
    )
    extract.warn_unextracted(cfg, "stage=eval")
    warn_unapplied(run.targets, {"targets": to_plain(cfg.targets)}, "stage=eval",
                   "To compute them with these: `pipeline stage=targets overwrite=true` and what follows.")  # fmt: skip
    with ActivationStore(store_path) as store:
        store_fp, layer = str(store.attrs["fingerprint"]), int(store.attrs["layer"])
        missing = [t.name for t in tasks if t.name not in store.tasks]
        if missing:
            raise StageError(f"the store {store_path} has no {missing}; re-run stage=extract with those tasks.")
        for task in tasks:
            store.check_task(task.to_dict())
        lm, tokenizer = lm_of_store(cfg, store.attrs, "evaluation")
        fit_top_k(methods, vocab := lm.get_output_embeddings().weight.shape[0])
        if (k := cfg.eval.alignment.fisher_top_k) is not None and k > vocab:
            log.warning("eval.alignment.fisher_top_k=%d is more tokens than the LM has (%d): G_F takes all %d", k, vocab,
                        vocab)  # fmt: skip
        source = f"{in_run(store_lm(cfg, store.attrs)['pretrained'], run.root)}` at block {layer}"
        fp = eval_fingerprint(cfg, store_fp, tasks, methods)
        out = run.eval
        check_inside(run.root, out)
        work = out.with_name(f".eval.partial-{fp}")
        finish_replace(out, work, fp)
        refuse_unrecorded(out, "the evaluation", cfg.overwrite, "any folder outside the run's eval/")
        if (done := current_result(out, fp, "the evaluation", cfg.overwrite)) is not None:
            drop_leftovers(out, work)
            return done
        work.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        torch.manual_seed(cfg.seed)
        logger = make_logger(cfg, "eval", run_id_file=work / "run_id")
        per_task = {}
        finished = read_finished(work)
        for task in tasks:
            if (saved := resumed(work, task, finished)) is not None:
                per_task[task.name] = saved
                continue
            data = read_task(store, task, cfg.targets.val_fraction, cfg.seed)
            results, figures = evaluate_task(cfg, data, methods, lm, tokenizer, store.attrs)
            if cfg.eval.figures:
                results["figures"] = task_figures(data, results, figures, work)
            text = strict_json(results, indent=1)  # standard JSON: a score with no value (NaN) is null
            atomic_write_text(work / f"{task.name}.json", text)
            finished[task.name] = task_digest(work, task.name)
            atomic_write_text(work / FINISHED, json.dumps(finished, indent=1))
            per_task[task.name] = json.loads(text)  # as a resumed evaluation reads it
    summary = report.write(per_task, cfg, work, round(time.perf_counter() - start, 1), methods, source)
    report.log_to(logger, work, summary)
    if logger:
        close_logger(logger)
    result = {"dir": str(out), "report": str(out / "report.md"), **summary["headline"], "seconds": summary["seconds"]}
    (work / FINISHED).unlink(missing_ok=True)  # the resume's bookkeeping: not part of the finished evaluation
    write_stamp(work, "eval", fp, result, home=out)  # before the move: the report never lies in place without its record
    replace_dir(work, out)
    log.info("evaluation written to %s", out / "report.md")
    return result
