"""The geometric facts the manifold-steering argument rests on, measured per task on a finished run's store and LM.

Nothing is forced: class centroids are the mean `h` of each class's rows (label −1 and empty classes skipped),
and `q` is read by putting an `h` at block ℓ of carrier prompts of class a (`CarrierTail`).

1. ring: PCA of the centred centroids. `pc12_share` is the share of their variance in PC 1–2; `angular_steps`
   are the wrapped angle differences (radians, in (−π, π], signs fixed so that they sum ≥ 0) of successive
   centroids in label order in the PC1–2 plane, last back to first on cyclic tasks; `monotone` says they all
   share a sign, `winding_deg` is |their sum| (≈ 360 for a cyclic ring traversed once), `radius_cv` the
   std/mean of the centroids' radii in that plane.
2. midpoint: the chord midpoint (c_a + c_b)/2 of pairs with a class strictly between them (forward a → b along
   the shorter arc on cyclic tasks). Mean q on the classes between (`between`, against the chance share
   #between/K, `between_chance`), on {a, b} (`endpoints`) and on "other".
3. mixture: along the chord (1 − t) c_a + t c_b, t in 33 points of [0, 1], max_t min(q_a, q_b) per carrier
   (0.5: a perfect 50/50 mixture), averaged over carriers and pairs: adjacent pairs (b = a + 1) and the
   midpoint's pairs.

Pairs and carriers are seeded samples. Figures go to benchmarks/results/facts-<model>.json.

    python -m benchmarks.model_facts --run outputs/<run_name> [--tasks weekdays months] [--carriers 8] [--pairs 24]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from geosteer.data.store import ActivationStore
from geosteer.models.steering import carrier_rows
from geosteer.models.tail import CarrierTail, log_concept_probs
from geosteer.pipeline.common import load_lm
from geosteer.pipeline.products import RunLayout

RESULTS = Path(__file__).parent / "results"
CHORD_POINTS = 33


def wrap(x: np.ndarray) -> np.ndarray:
    """Angles wrapped into (−π, π]."""
    return np.pi - np.mod(np.pi - x, 2 * np.pi)


def ring_facts(centroids: np.ndarray, cyclic: bool) -> dict:
    """Do the centroids (K, d), in label order, lie on a ring traversed in that order?"""
    x = centroids - centroids.mean(0)  # (K, d)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    xy = x @ vt[:2].T  # (K, 2)
    theta = np.arctan2(xy[:, 1], xy[:, 0])  # (K,)
    steps = wrap(np.diff(np.append(theta, theta[0]) if cyclic else theta))  # (K,) or (K-1,)
    steps = steps if steps.sum() >= 0 else -steps  # PCA's axes may come reflected
    r = np.linalg.norm(xy, axis=1)  # (K,)
    return {
        "pc12_share": float((s[:2] ** 2).sum() / (s**2).sum()),
        "angular_steps": steps.tolist(),
        "monotone": bool((steps > 0).all() or (steps < 0).all()),
        "winding_deg": float(abs(np.degrees(steps.sum()))),
        "radius_cv": float(r.std() / r.mean()),
    }


def between(a: int, b: int, K: int, cyclic: bool) -> list[int]:
    """Classes strictly between a and b: on cyclic tasks going forward from a, only when that is the shorter arc."""
    if not cyclic:
        return list(range(min(a, b) + 1, max(a, b)))
    step = (b - a) % K
    return [(a + i) % K for i in range(1, step)] if step <= K // 2 else []


def adjacent_pairs(classes: list[int], K: int, cyclic: bool) -> list[tuple[int, int]]:
    """(a, a + 1) for present classes, wrapping on cyclic tasks."""
    nxt = [(a, (a + 1) % K if cyclic else a + 1) for a in classes]
    return [(a, b) for a, b in nxt if b in classes and a != b]


@torch.no_grad()
def read_q(tail, h: np.ndarray, variant_ids) -> np.ndarray:
    """q on every carrier of `tail` with each h at block ℓ. h (M, d) → (C, M, K+1)"""
    C, M = len(tail), len(h)
    x = torch.as_tensor(h).to(tail.h).repeat(C, 1)  # (C·M, d), row c·M + m
    carrier = torch.arange(C, device=tail.h.device).repeat_interleave(M)
    logits = tail.logits(x, carrier).float()
    return log_concept_probs(logits, variant_ids).exp().view(C, M, -1).cpu().numpy()


def midpoint_facts(tails: dict, cent: dict, pairs: list[tuple[int, int]], K: int, cyclic: bool, variant_ids) -> dict:
    """Mean q shares at the chord midpoints of `pairs`, over carriers and pairs."""
    rows = []
    for a, b in pairs:
        q = read_q(tails[a], ((cent[a] + cent[b]) / 2)[None], variant_ids)[:, 0]  # (C, K+1)
        mid = between(a, b, K, cyclic)
        rows.append([q[:, mid].sum(1).mean(), q[:, [a, b]].sum(1).mean(), q[:, -1].mean(), len(mid) / K])
    means = np.mean(rows, 0)
    return dict(zip(["between", "endpoints", "other", "between_chance"], map(float, means))) | {"pairs": len(pairs)}


def mixture_peak(tails: dict, cent: dict, pairs: list[tuple[int, int]], variant_ids) -> float | None:
    """max_t min(q_a, q_b) along the chords of `pairs`, averaged over carriers and pairs; None without pairs."""
    t = np.linspace(0, 1, CHORD_POINTS)[:, None]  # (T, 1)
    peaks = []
    for a, b in pairs:
        q = read_q(tails[a], (1 - t) * cent[a] + t * cent[b], variant_ids)  # (C, T, K+1)
        peaks.append(np.minimum(q[..., a], q[..., b]).max(1).mean())
    return float(np.mean(peaks)) if peaks else None


def task_facts(store: ActivationStore, task: str, lm, tokenizer, layer: int, n_carriers: int, n_pairs: int,
               seed: int) -> dict:  # fmt: skip
    rows = store.read(task, ["h", "label", "prompt"])
    schema, labels = store.schema(task), rows["label"]
    K, cyclic = len(schema.values), store.group(task).attrs["topology"] == "cyclic"
    classes = [k for k in range(K) if (labels == k).any()]
    cent = {k: rows["h"][labels == k].astype(np.float64).mean(0) for k in classes}  # (d,) each
    far = [(a, b) for a in classes for b in classes if a != b and between(a, b, K, cyclic)]
    if len(classes) < 3 or not far:
        return {"n_classes": len(classes), "skipped": "fewer than 3 classes or no pair with a class between"}
    rng = np.random.default_rng(seed)
    far = [far[i] for i in np.sort(rng.choice(len(far), min(n_pairs, len(far)), replace=False))]
    near = adjacent_pairs(classes, K, cyclic)
    tails = {a: CarrierTail.of_prompts(lm, tokenizer, layer, rows["prompt"][carrier_rows(labels, a, n_carriers, seed)])
             for a in sorted({a for a, _ in far + near})}  # fmt: skip
    return {
        "n_classes": len(classes),
        "ring": ring_facts(np.stack([cent[k] for k in classes]), cyclic),
        "midpoint": midpoint_facts(tails, cent, far, K, cyclic, schema.variant_ids),
        "mixture": {
            "adjacent": mixture_peak(tails, cent, near, schema.variant_ids),
            "nonadjacent": mixture_peak(tails, cent, far, schema.variant_ids),
            "adjacent_pairs": len(near),
            "nonadjacent_pairs": len(far),
        },
    }


def model_facts(run_dir: Path, tasks: list[str] | None = None, n_carriers: int = 8, n_pairs: int = 24,
                seed: int = 0) -> dict:  # fmt: skip
    """{model, layer, tasks: {task: facts}} for the run at `run_dir`."""
    path = RunLayout(Path(run_dir)).store
    if not path.is_file():
        raise SystemExit(f"no activation store at {path}; run pipeline stage=extract first (for this run).")
    with ActivationStore(path) as store:
        attrs = store.attrs
        if unknown := sorted(set(tasks or []) - set(store.tasks)):
            raise SystemExit(f"tasks {unknown} are not in {path}; it holds {store.tasks}.")
        m = json.loads(attrs["config"])["model"]
        lm, tokenizer = load_lm(m)
        if m["device_map"] is None and torch.cuda.is_available():
            lm = lm.cuda()
        layer = int(attrs["layer"])
        facts = {t: task_facts(store, t, lm, tokenizer, layer, n_carriers, n_pairs, seed) for t in tasks or store.tasks}
    return {"model": str(attrs["model_name"]), "layer": layer, "tasks": facts}


def summary(task: str, f: dict) -> str:
    if "skipped" in f:
        return f"{task}: {f['n_classes']} classes, skipped ({f['skipped']})"
    r, m, x = f["ring"], f["midpoint"], f["mixture"]
    adj = "n/a" if x["adjacent"] is None else f"{x['adjacent']:.3f}"
    return (f"{task}: K={f['n_classes']} ring pc12 {r['pc12_share']:.2f} monotone {r['monotone']} "
            f"winding {r['winding_deg']:.0f}° cv {r['radius_cv']:.2f} | midpoint between {m['between']:.3f} "
            f"(chance {m['between_chance']:.3f}) ends {m['endpoints']:.3f} other {m['other']:.3f} | "
            f"mixture adjacent {adj} far {x['nonadjacent']:.3f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="the run folder, outputs/<run_name>")
    parser.add_argument("--tasks", nargs="+")
    parser.add_argument("--carriers", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="where the figures go (default: results/facts-<model>.json, cited)")
    args = parser.parse_args()
    result = model_facts(args.run, args.tasks, args.carriers, args.pairs, args.seed)
    for task, f in result["tasks"].items():
        print(summary(task, f))
    path = args.out or RESULTS / f"facts-{result['model']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
