"""The evaluation report: per-metric tables (methods × tasks), paired t-tests, verdicts, figures, JSON/CSV, W&B.

`pipeline.eval` hands over each task's per-pair numbers; everything here is
derived from them, so a report can be rebuilt from `results.json` alone.
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from geosteer.models.hub import strict_json
from geosteer.pipeline.common import atomic_write_text
from geosteer.pipeline.figures import bars_figure
from geosteer.pipeline.methods import SCORES, described

ALPHA = 0.05  # significance level of the comparisons, after Holm's correction


def mean_se(values) -> tuple[float, float, int]:
    """Mean, standard error and count of the finite values (None/NaN left out)."""
    v = np.array([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan, len(v)


BOOTSTRAP_DRAWS = 4000
MIN_CLASSES = 5  # a class-clustered bootstrap over fewer classes barely varies (2 classes: every usable draw alike)


def class_count(pairs) -> int:
    return len(np.unique(np.asarray(pairs).reshape(-1))) if len(pairs) else 0


def cluster_bootstrap(values, pairs, draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> np.ndarray:
    """The mean of per-pair `values` over class-clustered bootstrap resamples. (draws,), NaN where a draw keeps no value

    Pairs (a → b) that share a class are not independent (a → b and b → a least of all), so the resampled units are
    the classes: each draw takes the task's classes with replacement, and pair (a, b) counts count(a)·count(b) times.
    Every call with the same pairs draws the same classes (common random numbers across methods).
    """
    v = np.array([np.nan if x is None else x for x in values], dtype=float)
    ok = np.isfinite(v)
    a, b = np.asarray(pairs).T
    classes, index = np.unique(np.concatenate([a, b]), return_inverse=True)
    ia, ib = index[: len(a)], index[len(a) :]
    counts = np.random.default_rng(seed).multinomial(len(classes), np.full(len(classes), 1 / len(classes)), size=draws)
    weight = counts[:, ia] * counts[:, ib] * ok  # (draws, P)
    total = weight.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (weight * np.where(ok, v, 0)).sum(1) / total, np.nan)


def interval(values, pairs, level: float = 0.95) -> tuple[float, float]:
    """The class-clustered bootstrap percentile interval of the mean over pairs; NaN when no value is finite, or when
    the pairs span fewer than MIN_CLASSES classes (no interval the bootstrap gives there would hold its level)."""
    if class_count(pairs) < MIN_CLASSES:
        return math.nan, math.nan
    means = cluster_bootstrap(values, pairs)
    means = means[np.isfinite(means)]
    if len(means) == 0:
        return math.nan, math.nan
    return float(np.quantile(means, (1 - level) / 2)), float(np.quantile(means, (1 + level) / 2))


def paired_difference(x, y, pairs) -> tuple[float, float, int]:
    """Mean of x − y over the pairs where both are finite, its two-sided class-clustered bootstrap p-value, and the count.

    p = 2·min(share of resampled means ≤ 0, share ≥ 0), with the +1 of a Monte-Carlo test: never below 2/(draws + 1).
    NaN (not tested) when the pairs span fewer than MIN_CLASSES classes.
    """
    d = [a - b if a is not None and b is not None and np.isfinite(a) and np.isfinite(b) else None for a, b in zip(x, y)]
    n = sum(v is not None for v in d)
    if n < 2:
        return math.nan, math.nan, n
    mean = float(np.mean([v for v in d if v is not None]))
    if all(v == 0 for v in d if v is not None):
        return 0.0, 1.0, n
    if class_count(pairs) < MIN_CLASSES:
        return mean, math.nan, n
    means = cluster_bootstrap(d, pairs)
    means = means[np.isfinite(means)]
    tail = min((means <= 0).sum(), (means >= 0).sum())
    return mean, float(min(1.0, 2 * (tail + 1) / (len(means) + 1))), n


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values of m comparisons: max over j ≤ i of (m − j)·p_(j), capped at 1, in input order."""
    p = np.asarray(p, dtype=float)
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate((len(p) - np.arange(len(p))) * p[order])
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted


def halves(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of n pairs: the half that picks the best baseline, and the half it is tested on."""
    order = np.random.default_rng([seed, n]).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2 :])


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval for a success probability from k successes in n trials: the p with
    |k/n − p| ≤ z·√(p(1 − p)/n). Inside [0, 1] and not empty at k = 0 or k = n, where the normal one is."""
    if n == 0:
        return math.nan, math.nan
    z = NormalDist().inv_cdf((1 + level) / 2)
    p, z2 = k / n, z * z / n
    centre, half = (p + z2 / 2) / (1 + z2), z / (1 + z2) * math.sqrt(p * (1 - p) / n + z2 / (4 * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_q_b(entry: dict[str, Any], pairs: np.ndarray) -> np.ndarray:
    """The carrier-weighted mean q_b of `pairs` at every α. → (A,)"""
    n = np.array(entry["carriers"], dtype=float)[pairs]
    return (np.array(entry["q_b"])[pairs] * n[:, None]).sum(0) / n.sum()


def pick_alpha(entry: dict[str, Any], pairs: np.ndarray, threshold: float, alphas: list[float]) -> int:
    """The index (into `alphas`, in any order) of the smallest α whose mean q_b over the carriers of `pairs` reaches
    `threshold`; the largest q_b's when none does. `pairs` must not be empty."""
    q_b = mean_q_b(entry, pairs)  # (A,)
    reached = np.flatnonzero(q_b >= threshold)
    return int(min(reached, key=lambda i: alphas[i])) if len(reached) else int(q_b.argmax())


def own_point_rows(res: dict[str, Any], threshold: float, seed: int = 0) -> dict[str, dict[str, Any]]:
    """INNSteer's protocol, scored out of sample: α picked on one seeded half of the pairs (`pick_alpha`) is scored on
    the other, and the other way round. Per method: the two α, the carriers whose top-1 is b over all held-out
    trials with their Wilson interval, mean q_b, |argmax − b|, the share answering "other" and the off-target KL;
    and top-1 at α = 1, the rule as written."""
    alphas = res["alphas"]
    one, two = halves(len(res["methods"][next(iter(res["methods"]))]["carriers"]), seed)
    if not len(one) or not len(two):  # one pair: no half to pick α on that is not also the half it is scored on
        return {}
    out = {}
    for name, entry in res["methods"].items():
        chosen = {"first": pick_alpha(entry, one, threshold, alphas), "second": pick_alpha(entry, two, threshold, alphas)}
        trials = [(p, chosen["first"]) for p in two] + [(p, chosen["second"]) for p in one]  # (pair, α index)
        n = np.array(entry["carriers"], dtype=float)
        weight = np.array([n[p] for p, _ in trials])
        mean = lambda key: float(np.average([entry[key][p][i] for p, i in trials], weights=weight))  # noqa: E731
        distance = [(entry["distance"][p][i], n[p] * (1 - entry["other"][p][i])) for p, i in trials]
        distance = [(d, w) for d, w in distance if d is not None and w > 0] or [(math.nan, 1.0)]
        k, total = sum(entry["top1"][p][i] for p, i in trials), int(weight.sum())
        at_one = alphas.index(1.0) if 1.0 in alphas else None
        out[name] = {
            "label": entry["label"], "alpha": [alphas[chosen["first"]], alphas[chosen["second"]]], "top1": k, "n": total,
            "reached": [bool(mean_q_b(entry, half)[chosen[key]] >= threshold) for half, key in ((one, "first"), (two, "second"))],
            "wilson": wilson(k, total), "q_b": mean("q_b"), "other": mean("other"), "kl": mean("kl"),
            "distance": float(np.average([d for d, _ in distance], weights=[w for _, w in distance])),
            "top1_at_1": None if at_one is None else sum(entry["top1"][p][at_one] for p in range(len(n))) / n.sum(),
        }  # fmt: skip
    return out


def summarise(per_task: dict[str, dict[str, Any]], directions: dict[str, int]) -> list[dict[str, Any]]:
    """One row per (task, method, metric): mean, s.e. and class-clustered bootstrap interval over pairs, and the
    comparison with the best baseline.

    The best baseline is picked on one seeded half of the pairs and every other method is tested against it on the
    other half (`paired_difference`: `diff`, `p`), so choosing the winner does not inflate the test; `p_holm` corrects
    `p` for the comparisons of the row's table (one metric, every task and method).
    """
    rows = []
    for task, res in per_task.items():
        methods = {m: e for m, e in res["methods"].items() if "per_pair" in e}
        pairs = [tuple(p) for p in res["pairs"]]
        pick, test = halves(len(pairs))
        for metric, sign in directions.items():
            values = {m: e["per_pair"][metric] for m, e in methods.items()}
            stat = {m: mean_se(v) for m, v in values.items()}
            on_pick = {m: mean_se([v[i] for i in pick]) for m, v in values.items()}
            baselines = [m for m, e in methods.items() if e["role"] == "baseline" and on_pick[m][2] > 0 and stat[m][2] > 1]
            best = max(baselines, key=lambda m: sign * on_pick[m][0]) if baselines else None
            for m, (mean, se, n) in stat.items():
                lo, hi = interval(values[m], pairs)
                row = {"task": task, "method": m, "label": methods[m]["label"], "metric": metric, "mean": mean, "se": se,
                       "lo": lo, "hi": hi, "n": n, "best_baseline": best, "diff": math.nan, "p": math.nan}  # fmt: skip
                if best is not None and m != best:
                    row["diff"], row["p"], _ = paired_difference([values[m][i] for i in test], [values[best][i] for i in test],
                                                                 [pairs[i] for i in test])  # fmt: skip
                rows.append(row)
    for metric in directions:
        tested = [r for r in rows if r["metric"] == metric and np.isfinite(r["p"])]
        for r, q in zip(tested, holm([r["p"] for r in tested])):
            r["p_holm"] = float(q)
    for r in rows:
        r.setdefault("p_holm", math.nan)
    return rows


def _fmt(mean: float, se: float, digits: int = 3) -> str:
    if not np.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f} ± {se:.{digits}f}" if np.isfinite(se) else f"{mean:.{digits}f}"


def _ci(mean: float, lo: float, hi: float, digits: int = 3) -> str:
    if not np.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]" if np.isfinite(lo) else f"{mean:.{digits}f}"


def _cell(row: dict[str, Any], sign: int) -> str:
    """mean [95 % interval], with ▲/▼ when it differs from the best baseline after Holm's correction (▲: better),
    ★ on the best baseline."""
    text = _ci(row["mean"], row["lo"], row["hi"])
    if row["method"] == row["best_baseline"]:
        return text + " ★"
    if np.isfinite(row["p_holm"]) and row["p_holm"] < ALPHA:
        better = sign * row["diff"] > 0
        return text + (" ▲" if better else " ▼")
    return text


def metric_table(rows: list[dict[str, Any]], per_task: dict[str, Any], metric: str, sign: int) -> str:
    tasks = list(per_task)
    methods = list(dict.fromkeys(m for res in per_task.values() for m in res["methods"]))
    lines = ["| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    index = {(r["task"], r["method"]): r for r in rows if r["metric"] == metric}
    for m in methods:
        label = next(res["methods"][m]["label"] for res in per_task.values() if m in res["methods"])
        cells = []
        for t in tasks:
            entry = per_task[t]["methods"].get(m, {})
            if (t, m) in index and index[(t, m)]["n"] > 0:
                cells.append(_cell(index[(t, m)], sign))
            elif "reason" in entry or (entry.get("no_path_pairs") and entry["no_path_pairs"] == len(per_task[t]["pairs"])):
                cells.append("n/a¹")  # not evaluated, or no pair had a path (INNSteer without its classes' means)
            else:
                cells.append("–²")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(per_task: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The three directional claims of the Riemannian manifold-steering paper, checked on our runs."""
    out = []

    def pp(task: str, method: str, metric: str):
        return per_task[task]["methods"].get(method, {}).get("per_pair", {}).get(metric)

    # 1. GAGA-Out lands the target more decisively than linear and spline: the paths share their ends, so each carrier
    # walks its own copy of the path to the same Hellinger budget, and the methods stop apart (`eval.at_budget`).
    tests, lines, ties, untested = [], [], 0, 0
    for task in per_task:
        pairs = [tuple(p) for p in per_task[task]["pairs"]]
        for metric in ("top1_budget", "q_b_budget"):
            g = pp(task, "gaga_out", metric)
            for base in ("linear", "spline"):
                b = pp(task, base, metric)
                if g is None or b is None:
                    continue
                if g == b:  # the same endpoint, fully replaced: the same behaviour there, pair for pair
                    ties += 1
                    lines.append(f"{task} {metric}: GAGA-Out = {base} on every pair")
                    continue
                diff, p, n = paired_difference(g, b, pairs)
                if np.isfinite(p):
                    tests.append((task, metric, base, diff, p, n))
                else:
                    untested += 1
                    lines.append(f"{task} {metric}: GAGA-Out − {base} = {diff:+.4f}, not tested ({n} pairs over "
                                 f"{class_count(pairs)} classes; a test needs 2 pairs and {MIN_CLASSES} classes)")  # fmt: skip
    adjusted = holm([t[4] for t in tests]) if tests else []
    holds = []
    for (task, metric, base, diff, p, n), q in zip(tests, adjusted):
        ok = diff > 0 and q < ALPHA
        holds.append(ok)
        lines.append(
            f"{task} {metric}: GAGA-Out − {base} = {diff:+.4f} (p = {p:.2g}, Holm {q:.2g}, n = {n}){' ✓' if ok else ' ✗'}"
        )
    verdict = (_verdict(holds, untested) if holds else "not testable: every comparison is a tie" if ties and not untested
               else UNTESTED if untested else "not tested (a method it needs is off)")  # fmt: skip
    if ties:
        verdict += f"; {ties} of {ties + len(holds) + untested} comparisons are exact ties"
    if tests:
        verdict += f"; the largest margin is {max((t[3] for t in tests), key=abs):+.4f}"
    out.append({"claim": "GAGA-Out lands the target more decisively than linear and spline (top-1 = b and q_b where "
                         "each carrier's own copy of the path has gone its Hellinger distance to b)",
                "verdict": verdict, "evidence": lines})  # fmt: skip
    # 2. GAGA-Out has lower E_B than the best baseline on weekdays and months.
    lines, holds, untested = [], [], []
    for task in ("weekdays", "months"):
        row = next((r for r in rows if r["task"] == task and r["method"] == "gaga_out" and r["metric"] == "E_B"), None)
        if row is None:
            continue
        if row["best_baseline"] is None:  # baselines on, but none with values on both halves of the pairs to pick from
            if any(e["role"] == "baseline" for e in per_task[task]["methods"].values()):
                untested.append(task)
                lines.append(f"{task}: not tested (no best baseline: too few pairs, {len(per_task[task]['pairs'])}, to "
                             f"pick one on a half of them and test on the other)")  # fmt: skip
            continue
        base = next(r for r in rows if r["task"] == task and r["method"] == row["best_baseline"] and r["metric"] == "E_B")
        if not np.isfinite(row["p"]):
            untested.append(task)
            lines.append(f"{task}: GAGA-Out − best baseline {base['label']}, not tested (too few pairs on the test "
                         f"half, or fewer than {MIN_CLASSES} classes)")  # fmt: skip
            continue
        ok = row["diff"] < 0 and np.isfinite(row["p_holm"]) and row["p_holm"] < ALPHA
        holds.append(ok)
        lines.append(f"{task}: GAGA-Out {_ci(row['mean'], row['lo'], row['hi'])} vs best baseline {base['label']} "
                     f"{_ci(base['mean'], base['lo'], base['hi'])}; on the test half GAGA-Out − it = {row['diff']:+.4f} "
                     f"(p = {row['p']:.2g}, Holm {row['p_holm']:.2g}){' ✓' if ok else ' ✗'}")  # fmt: skip
    verdict = _verdict(holds, len(untested))
    if absent := [t for t in ("weekdays", "months") if t not in per_task]:  # the claim names both tasks
        other = "months" if absent == ["weekdays"] else "weekdays"
        verdict = ("not tested: this run evaluated neither weekdays nor months" if len(absent) == 2 else
                   f"{verdict[:-1]}; {absent[0]} was not evaluated)" if verdict.endswith(")") and not holds else
                   f"{verdict}, on {other} only: {absent[0]} was not evaluated")  # fmt: skip
    out.append({"claim": "GAGA-Out has lower E_B than the best baseline on weekdays and months",
                "verdict": verdict, "evidence": lines})  # fmt: skip
    # 3. GAGA-Out and G_out geodesics agree.
    tests = []
    for task, res in per_task.items():
        agreement = res.get("agreement", {})
        if "gaga_out" in agreement and "linear" in agreement:
            pairs = [tuple(p) for p in res["pairs"]]
            tests.append((task, *paired_difference(agreement["gaga_out"], agreement["linear"], pairs), agreement, pairs))
    untested = [t[0] for t in tests if not np.isfinite(t[2])]
    lines = [f"{t[0]}: not tested ({t[3]} pairs over {class_count(t[5])} classes; a test needs 2 pairs and {MIN_CLASSES} "
             f"classes)" for t in tests if not np.isfinite(t[2])]  # fmt: skip
    tests = [t for t in tests if np.isfinite(t[2])]
    adjusted = holm([t[2] for t in tests]) if tests else []
    holds = []
    for (task, diff, p, _n, agreement, pairs), q in zip(tests, adjusted):
        ok = diff < 0 and q < ALPHA
        holds.append(ok)
        lines.append(f"{task}: GAGA-Out's geodesic deviates {_pct(agreement['gaga_out'], pairs)} % of the endpoint distance "
                     f"from G_out's, the chord {_pct(agreement['linear'], pairs)} %; difference {100 * diff:+.1f} points "
                     f"(p = {p:.2g}, Holm {q:.2g}){' ✓' if ok else ' ✗'}")  # fmt: skip
    out.append({"claim": "GAGA-Out and G_out geodesics agree (deviation ÷ endpoint distance; ✓ when significantly closer "
                         "to G_out's than the chord is, after Holm's correction)",
                "verdict": _verdict(holds, len(untested)), "evidence": lines})  # fmt: skip
    return out


UNTESTED = f"not testable: too few pairs or classes (a test needs 2 pairs and {MIN_CLASSES} classes)"


def _verdict(holds: list[bool], untested: int = 0) -> str:
    """The verdict of the tested comparisons; `untested` more could not be tested (too few pairs or classes)."""
    if not holds:
        return UNTESTED if untested else "not tested (a method it needs is off)"
    verdict = ("reproduced" if all(holds) else "not reproduced" if not any(holds) else
               f"partly reproduced ({sum(holds)} of {len(holds)} comparisons)")  # fmt: skip
    return verdict + (f"; {untested} more not testable (too few pairs or classes)" if untested else "")


def write(per_task: dict[str, Any], cfg, folder: Path, seconds: float, methods: dict[str, Any], lm: str) -> dict[str, Any]:
    """results.json, results.csv, bars.png and report.md in `folder`; returns the summary.

    `methods`: name → method; `lm`: the LM and block the activations came from, for the header.
    """
    rows = summarise(per_task, {m: score.direction for m, score in SCORES.items()})
    claims = verdicts(per_task, rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["task"])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(folder / "results.csv", buffer.getvalue())
    own = {t: scored for t, r in per_task.items()
           if "methods" in r.get("own_point", {}) and (scored := own_point_rows(r["own_point"], cfg.eval.threshold))}  # fmt: skip
    atomic_write_text(folder / "results.json", strict_json({"summary": rows, "verdicts": claims, "own_point": own,
                                                              "tasks": per_task, "seconds": seconds}, indent=1, default=str))  # fmt: skip
    if cfg.eval.figures and rows:
        bars_figure(rows, per_task, folder / "bars.png")
    atomic_write_text(folder / "report.md", markdown(per_task, rows, claims, own, cfg, seconds, methods, lm))
    gaga = {r["task"]: r["mean"] for r in rows if r["method"] == "gaga_out" and r["metric"] == "top1_at_end"}
    return {"headline": {"verdicts": {c["claim"]: c["verdict"] for c in claims}, "gaga_out_top1_at_end": gaga},
            "rows": rows, "seconds": seconds}  # fmt: skip


def markdown(per_task: dict[str, Any], rows, claims, own, cfg, seconds: float, methods: dict[str, Any], lm: str) -> str:
    e = cfg.eval
    tasks = list(per_task)
    md = ["# geosteer evaluation", "",  # the run is the folder it lies in (named nowhere inside, so that a copy is whole)
          f"LM `{lm}; tasks {', '.join(tasks)}; "
          f"{e.steps + 1} waypoints per path, {_carriers(per_task, e.carriers)} of the source class per pair, "
          f"threshold q_b ≥ {e.threshold} for the iterative methods (at most {e.max_steps} steps); seed {cfg.seed}. "
          f"Pairs: " + ", ".join(f"{t} {len(r['pairs'])}" for t, r in per_task.items()) +
          f" (every ordered pair when K ≤ {e.all_pairs_max_k} or there are at most {e.max_pairs}, else a seeded "
          f"sample of {e.max_pairs}). Geodesics by L-BFGS of at most {e.lbfgs.max_iter} iterations (history "
          f"{e.lbfgs.history_size}{'' if e.max_iter_cap is None else f'; G_out’s capped at {e.max_iter_cap}'}), "
          f"λ_reg = {e.lam_rel:g} × each pullback metric's eigenvalue scale; the Hellinger budget's walks cut each "
          f"segment into {e.budget_between} pieces. Whole stage: "
          f"{seconds / 60:.1f} min.", "",
          "## Verdicts: the paper's directional claims on our runs", ""]  # fmt: skip
    for i, c in enumerate(claims, 1):
        md += [f"{i}. **{c['claim']}: {c['verdict']}.**", *[f"   - {line}" for line in c["evidence"]], ""]
    md += ["## Behaviour along the paths (docs/method.md §9)", "",
           "Mean over pairs [95 % class-clustered bootstrap interval: classes resampled, since pairs sharing a class are "
           "not independent]. ★ the best baseline (linear, spline, CAA, FishBack, dual) for that metric and task, picked on "
           "a seeded half of the pairs; ▲/▼ better/worse than it on the other half (class-clustered bootstrap test of the "
           f"paired difference) at p < {ALPHA} after Holm's correction across the table's comparisons; a task of fewer "
           f"than {MIN_CLASSES} classes gets neither interval nor test. "
           "n/a¹ not evaluated (the reason is under “Empty cells”); –² no defined value "
           "(visit-intermediates needs classes between a and b; the KL needs a carrier to reach the threshold; the Hellinger "
           "budget walks a path method's path, so the iterative methods have none).", ""]  # fmt: skip
    for metric, score in SCORES.items():
        md += [f"### {score.title}", "", metric_table(rows, per_task, metric, score.direction), ""]
    md += ["## Against the analytical metric G_out", "", "### Surrogate agreement", "",
           "Mean over waypoints of ‖w_t − w_t^{G_out}‖ / ‖x_b − x_a‖ (%), mean over pairs [95 % class-clustered bootstrap interval]; every geodesic by the "
           "same L-BFGS except the bridge (its own forward pass) and INNSteer (φ⁻¹ of the latent chord, its exact "
           "geodesic). The chord is the scale: a learned metric helps only where it lands nearer than the chord.", "",
           _table(per_task, lambda r: {m: _pct(v, r["pairs"]) for m, v in r.get("agreement", {}).items() if m != "reason"},
                  {"linear": "chord", **{m: spec.label for m, spec in methods.items()}}, "agreement"), ""]  # fmt: skip
    target = next((m for m, method in methods.items() if method.role == "target"), None)
    solves = {t: r["methods"][target]["solve"] | {"pairs": r["pairs"]} for t, r in per_task.items()
              if target and "solve" in r["methods"].get(target, {})}  # fmt: skip
    if solves:
        md += ["### The G_out geodesic", "",
               "Hellinger arc length Σ arccos⟨√q_i, √q_i+1⟩/√2 of each pair's path on the pinned carrier, every segment cut into 8 straight pieces "
               "in h (so a path cannot look short by jumping between waypoints), against its lower bound, the great "
               "circle of √q between the endpoints; the mean over pairs of the ratio to the bound [95 % class-clustered "
               "bootstrap interval], and which start "
               "each pair's geodesic came from.", "",
               _table(solves, lambda r: {
                   "geodesic": _per_pair(np.divide(r["length_geodesic"], r["great_circle"]), r["pairs"]),
                   "chord": _per_pair(np.divide(r["length_chord"], r["great_circle"]), r["pairs"]),
                   "starts": ", ".join(f"{k} {v}" for k, v in sorted(Counter(r["start"]).items()))},
                   {"geodesic": "G_out geodesic ÷ great circle", "chord": "chord ÷ great circle",
                    "starts": "winning start (pairs)"}), ""]  # fmt: skip
    md += ["### Path energy under G_out", "",
           "Each geodesic's secant energy Σ‖√q(w_{t+1}) − √q(w_t)‖² on the pinned carrier ÷ the G_out geodesic's, mean over "
           "pairs [95 % class-clustered bootstrap interval]: 1 is as low as G_out's own; the chord (linear) is the scale.", "",
           _table(per_task, lambda r: {m: _per_pair(v, r["pairs"]) for m, v in r.get("energy", {}).items() if m != "reason"},
                  {"linear": "chord", **{m: spec.label for m, spec in methods.items()}}, "energy"), ""]  # fmt: skip
    if own:
        md += ["## INNSteer's protocol: every carrier steered from its own h", "",
               f"Every carrier of the source class (up to {e.own_point.max_carriers}) moved from its own activation by "
               "INNSteer's φ⁻¹(φ(h) + α(μ_b − μ_a)) and by CAA's h + α(μ_b − μ_a), so the methods end apart. α, from "
               f"{list(e.own_point.alphas)}, is the smallest whose mean q_b reaches {e.threshold} on one seeded half of the "
               "pairs, scored on the other half, and the other way round (both α shown): both methods stand at the same "
               "target probability, and their off-target KL compares; an α marked * reached no threshold on its half (the "
               "α of the largest q_b), and there the methods do not stand at the same target probability. **Top-1 = b**: the share of held-out carrier trials "
               "[95 % Wilson interval; carriers of one class are not independent, so read it as a lower bound on the "
               "uncertainty]. “Classes off”: |argmax − b| in classes (the shorter way round on a cyclic task) among carriers that "
               "answer a concept; “other”: the share that answer none.", "",
               _table(own, lambda r: {m: f"{v['top1'] / v['n']:.3f} [{v['wilson'][0]:.3f}, {v['wilson'][1]:.3f}]; "
                                         f"α {v['alpha'][0]:g}{'' if v['reached'][0] else '*'}/"
                                         f"{v['alpha'][1]:g}{'' if v['reached'][1] else '*'}" for m, v in r.items()},
                      {m: f"{v['label']}: top-1 = b" for r in own.values() for m, v in r.items()}),
               "",
               _table(own, lambda r: {m: f"q_b {v['q_b']:.3f}; classes off {v['distance']:.2f}; other {v['other']:.3f}; "
                                         f"KL {v['kl']:.3f}" for m, v in r.items()},
                      {m: f"{v['label']}: graded" for r in own.values() for m, v in r.items()}),
               "",
               _table(own, lambda r: {m: "–" if v["top1_at_1"] is None else f"{v['top1_at_1']:.3f}" for m, v in r.items()},
                      {m: f"{v['label']}: top-1 = b at α = 1, every pair" for r in own.values() for m, v in r.items()}),
               ""]  # fmt: skip
    labels = {m: method.metric_label for m, method in methods.items() if method.metric_label}
    compared = lambda r: {m: v for m, v in r["alignment"].items() if isinstance(v, dict) and "gram_cosine" in v}  # noqa: E731
    md += ["### Metric alignment on held-out points", "",
           f"Up to {e.alignment.points} held-out activations, each in its own prompt; every measure is blind to λ_reg. "
           "**Centred Gram cosine** cos(G − τI, G_out − τ'I) (τ = tr/d), mean ± s.e. over points: 1 when the metrics are "
           "equal up to scale. Its ceiling is G_out at the same points under another prompt; its floor, in brackets, "
           "the same metric turned by a random rotation (same spectrum, no relation).", "",
           _table(per_task, lambda r: {"ceiling": _fmt(*mean_se(r["alignment"]["ceiling"])[:2])} if "ceiling" in r["alignment"] else {},
                  {"ceiling": "ceiling: G_out under another prompt"}),  # fmt: skip
           "",
           _table(per_task, lambda r: {m: f"{_fmt(*mean_se(v['gram_cosine'])[:2])} (floor {mean_se(v['floor'])[0]:.2f})"
                                       for m, v in compared(r).items()}, labels, empty=NO_METRIC),
           "",
           "**Trace shares**: the share of G_out's trace in the metric's top-r eigenspace (r its effective rank, the "
           "participation ratio) and of the metric's trace in G_out's, each against its chance r/d.", "",
           _table(per_task, lambda r: {m: f"{mean_se(v['share_of_G_out'])[0]:.2f} / {mean_se(v['share_of_G'])[0]:.2f} "
                                          f"(chance {v['chance_of_G_out']:.2f} / {v['chance_of_G']:.2f}; r {v['rank']:.1f} / "
                                          f"{v['rank_out']:.1f})" for m, v in compared(r).items()}, labels, empty=NO_METRIC),
           "",
           "**Spearman ρ** of vᵀG v against vᵀG_out v over the directions v from each point towards the other classes "
           f"(their centroids and its {e.alignment.neighbours} nearest training points of another class), mean ± s.e. "
           "over points.", "",
           _table(per_task, lambda r: {m: _fmt(*mean_se(v["spearman"])[:2]) for m, v in compared(r).items()}, labels, empty=NO_METRIC),
           ""]  # fmt: skip
    reasons = [f"- {t}/{m}: {v['reason']}" for t, r in per_task.items() for m, v in r["alignment"].items()
               if isinstance(v, dict) and "reason" in v]  # fmt: skip
    md += [*reasons, "", "### FishBack diagnostics at the layer", "",
           "Relative spectral deviation from the Euclidean metric, 1 − λ_r/λ_1 over each metric's top-r eigenvalues "
           "(r its effective rank; λ_reg excluded, which would otherwise be all a rank-deficient metric's λ_min reports), "
           "and effective dimensionality (participation ratio ÷ d), mean over the held-out points; G_F over "
           + ("the whole vocabulary." if e.alignment.fisher_top_k is None else
              f"each point's {e.alignment.fisher_top_k} most probable tokens (the whole vocabulary if it has fewer)."),
           "",
           _table(per_task, lambda r: {f"{g} {k}": _fmt(*mean_se(r["alignment"][g][key])[:2], digits=4)
                                       for g in ("G_out", "G_F") for k, key in (("deviation", "spectral_deviation"),
                                                                                 ("eff. dim", "effective_dim"))}, {}), ""]  # fmt: skip
    if cfg.eval.figures:
        md += ["## Figures", "", "- [E_B and target_prob_end per method](bars.png)", ""]
        for t, r in per_task.items():
            md += [f"- {t}: " + ", ".join(f"[{name}]({f})" for name, f in r.get("figures", {}).items())]
        md += ["", "![bars](bars.png)", ""]
    else:
        md += ["## Figures", "", "Not drawn (eval.figures=false).", ""]
    times = lambda r: {**{m: f"{v['seconds']:.1f}" for m, v in r["methods"].items() if "seconds" in v},  # noqa: E731
                       "own h": f"{r.get('own_point', {}).get('seconds', math.nan):.1f}",
                       "against G_out": f"{r['alignment']['seconds']:.1f}"}  # fmt: skip
    md += ["## Time per method (s)", "", _table(per_task, times, {m: spec.label for m, spec in methods.items()}),
           "", "## Methods", "", "| method | path |", "|---|---|",
           *[f"| {spec.label} | {described(spec)} |" for spec in methods.values()], ""]  # fmt: skip
    missing = [f"- {t}/{m}: {v['reason']}" for t, r in per_task.items() for m, v in r["methods"].items() if "reason" in v]
    missing += [f"- {t}/{m}: {v['non_finite_pairs']} of {len(r['pairs'])} pairs gave non-finite output probabilities "
                f"(an overflow; with model.dtype={cfg.model.dtype}, use float32 or bfloat16) and are left out"
                for t, r in per_task.items() for m, v in r["methods"].items() if v.get("non_finite_pairs")]  # fmt: skip
    missing += [f"- {t}/{m}: {v['no_path_pairs']} of {len(r['pairs'])} pairs have no path and are left out: "
                f"{(v.get('solve') or {}).get('left_out', 'the method gave none')}"
                for t, r in per_task.items() for m, v in r["methods"].items() if v.get("no_path_pairs")]  # fmt: skip
    missing += [f"- {t}: INNSteer's protocol (own h): {r['own_point']['reason']}" for t, r in per_task.items()
                if "reason" in r.get("own_point", {})]  # fmt: skip
    if missing:
        md += ["## Empty cells", "", *missing, ""]
    md += ["G_out's L-BFGS runs on one pinned carrier per task (the prompt whose activation is nearest the task's mean): "
           + "; ".join(f"{t}: {r['canonical_carrier']!r}" for t, r in per_task.items()) + ".", ""]  # fmt: skip
    return "\n".join(md)


def _pct(values, pairs) -> str:
    """Mean over pairs in %, with its class-clustered bootstrap interval."""
    return _per_pair(100 * np.array([np.nan if v is None else v for v in values], dtype=float), pairs, digits=1)


def _per_pair(values, pairs, digits: int = 3) -> str:
    """Mean of per-pair values with its class-clustered bootstrap interval."""
    return _ci(mean_se(values)[0], *interval(values, [tuple(p) for p in pairs]), digits=digits)


NO_METRIC = "no method with a metric of its own is evaluated (GAGA-Out, GAGA-Jac, GAGA-PHATE or INNSteer)"


def _carriers(per_task: dict[str, Any], asked: int) -> str:
    """How many carriers each pair had: eval.carriers, or fewer where the source class has fewer rows."""
    fewer = {t: sizes for t, r in per_task.items() if (sizes := r.get("carriers_per_pair")) and min(sizes) < asked}
    if not fewer:
        return f"{asked} seeded carriers"
    return (
        f"up to {asked} seeded carriers (fewer where the class has fewer rows: "
        + ", ".join(f"{t} {min(s)}–{max(s)}" for t, s in fewer.items())
        + ")"
    )


def _table(per_task: dict[str, Any], cells, labels: dict[str, str], part: str | None = None, empty: str = "") -> str:
    """A methods × tasks table of `cells(task_results) -> {row: text}`; with no row, why: the `reason` that `part` of
    the results holds, or `empty`."""
    tasks = list(per_task)
    by_task = {t: cells(r) for t, r in per_task.items()}
    keys = list(dict.fromkeys(k for c in by_task.values() for k in c))
    if not keys and (part is not None or empty):
        reasons = dict.fromkeys(
            str((r.get(part) or {}).get("reason") or empty or "no method to compare") for r in per_task.values()
        )
        return f"Not computed: {'; '.join(reasons)}."
    lines = ["| | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    lines += [f"| {labels.get(k, k)} | " + " | ".join(by_task[t].get(k, "–") for t in tasks) + " |" for k in keys]
    return "\n".join(lines)


# ---- W&B -------------------------------------------------------------------------------------------


def log_to(logger, folder: Path, summary: dict[str, Any]) -> None:
    """Tables and figures to the stage's logger: wandb.Table and images for W&B, the means for CSV."""
    if not logger:
        return
    rows = summary["rows"]
    logger.log_metrics({f"eval/{r['task']}/{r['method']}/{r['metric']}": r["mean"] for r in rows if np.isfinite(r["mean"])})
    if not hasattr(logger, "log_table"):
        return
    columns = ["task", "method", "metric", "mean", "se", "lo", "hi", "n", "best_baseline", "diff", "p", "p_holm"]
    logger.log_table("eval/results", columns=columns, data=[[r[c] for c in columns] for r in rows])
    for metric in SCORES:
        tasks = list(dict.fromkeys(r["task"] for r in rows))
        wide = {}
        for r in rows:
            if r["metric"] == metric:
                wide.setdefault(r["label"], {})[r["task"]] = r["mean"]
        logger.log_table(f"eval/table/{metric}", columns=["method", *tasks],
                         data=[[m, *[v.get(t) for t in tasks]] for m, v in wide.items()])  # fmt: skip
    for png in sorted(folder.glob("*.png")):
        logger.log_image(f"eval/figures/{png.stem}", [str(png)])
