"""stage=targets at scale, and on-the-fly batch distances against a dense N×N matrix.

For N = 5k, 20k and 50k synthetic points of dimension 256 (a noisy closed
curve, 12 answer classes, a q concentrated near each point's class), each size
runs in a fresh process:

1. the stage's own per-task work (`pipeline.targets.task_targets`: cache keys,
   split, Hellinger, PHATE, pair std, the atomic HDF5 write) and its figure,
   with the default settings (exact PHATE up to 5,000 points, 2,000 landmarks
   above); wall time per part and the process's peak resident memory;
2. the cost of one batch of B = 256 target distances, `torch.pdist` of the
   batch's coordinates (what `PairwiseTargets.batch` does) against gathering
   the block from a precomputed dense N×N float32 matrix, timed in the same
   process as a ratio. At 50k the dense matrix would take 9.3 GiB, so it is
   not built and only the on-the-fly cost is reported.

Figures go to benchmarks/results/targets.json.

    python -m benchmarks.targets [--sizes 5000 20000 50000] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from geosteer.pipeline.common import CONFIG_DIR, to_plain
from geosteer.pipeline.targets import figure, task_targets

D, K, BATCH, N_BATCHES = 256, 12, 256, 200
RESULTS = Path(__file__).parent / "results" / "targets.json"


def synthetic_task(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """h (n, 256) on a noisy closed curve, labels from the curve angle, q peaked at the label."""
    rng = np.random.default_rng(seed)
    angle = rng.uniform(0, 2 * np.pi, n)
    curve = np.stack([np.cos(angle), np.sin(angle), np.cos(2 * angle), np.sin(3 * angle)], 1)
    h = curve @ rng.standard_normal((4, D)) + 0.3 * rng.standard_normal((n, D))
    centres = 2 * np.pi * (np.arange(K) + 0.5) / K
    logits = 4 * np.cos(angle[:, None] - centres[None]) + 0.5 * rng.standard_normal((n, K))
    logits = np.concatenate([logits, np.full((n, 1), -1.0)], 1)  # the "other" bin
    q = np.exp(logits - logits.max(1, keepdims=True))
    label = np.floor(angle / (2 * np.pi) * K).astype(np.int32)
    return {"h": h.astype(np.float32), "q": (q / q.sum(1, keepdims=True)).astype(np.float32), "label": label}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def time_batches(fn, n: int, rng: np.random.Generator) -> float:
    """Median seconds of `fn(index)` over N_BATCHES random batches."""
    times = []
    for _ in range(N_BATCHES):
        index = torch.from_numpy(rng.choice(n, BATCH, replace=False))
        start = time.perf_counter()
        fn(index)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def one_size(n: int) -> dict:
    """Everything for one N, in this process (so peak memory is this size's alone)."""
    tcfg = to_plain(OmegaConf.load(CONFIG_DIR / "targets" / "default.yaml"))
    rows = synthetic_task(n)
    baseline = peak_rss_gib()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        with tqdm(total=2, disable=True) as bar:
            summary, groups = task_targets("synthetic", rows, Path(tmp) / "synthetic.h5", tcfg, 0, {}, bar)
        stage_s = time.perf_counter() - start
        start = time.perf_counter()
        figure("synthetic", rows["label"], groups, True, Path(tmp) / "synthetic.png")
        figure_s = time.perf_counter() - start
        file_mib = (Path(tmp) / "synthetic.h5").stat().st_size / 2**20
    out = {
        "n": n,
        "stage_seconds": stage_s,
        "figure_seconds": figure_s,
        "phate_seconds": summary["phate"]["seconds"],
        "phate_landmarks": summary["phate"]["landmarks"],
        "phate_dim": summary["phate"]["dim"],
        "phate_t": summary["phate"]["t"],
        "hellinger_seconds": summary["hellinger"]["seconds"],
        "targets_file_mib": file_mib,
        "peak_rss_gib": peak_rss_gib(),
        "rss_after_imports_gib": baseline,
    }
    # Per-batch target distances: on the fly from coordinates, or gathered from a dense N×N matrix.
    rng = np.random.default_rng(1)
    iu = torch.triu_indices(BATCH, BATCH, 1)
    for name in ("hellinger", "phate"):
        coords = torch.from_numpy(groups[name]["coords"].astype(np.float32))  # as PairwiseTargets holds them
        out[f"{name}_pdist_ms"] = 1e3 * time_batches(lambda i: torch.pdist(coords[i]), n, rng)
    dense_gib = n * n * 4 / 2**30
    out["dense_matrix_gib"] = dense_gib
    if dense_gib <= 4:
        coords = torch.from_numpy(groups["hellinger"]["coords"].astype(np.float32))
        dense = torch.empty(n, n)  # the gather costs the same whatever the matrix holds
        for s in range(0, n, 2048):
            dense[s : s + 2048] = torch.cdist(coords[s : s + 2048], coords, compute_mode="donot_use_mm_for_euclid_dist")
        out["dense_gather_ms"] = 1e3 * time_batches(lambda i: dense[i][:, i][iu[0], iu[1]], n, rng)
        for name in ("hellinger", "phate"):
            out[f"{name}_ratio_pdist_over_gather"] = out[f"{name}_pdist_ms"] / out["dense_gather_ms"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 50000])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one size, print JSON
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(one_size(args.one)))
        return
    results = []
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--one", str(n), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parents[1])
        if proc.returncode:
            sys.exit(f"N={n} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1], indent=2))
    meta = {
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": platform.machine(),
        "d": D,
        "K": K,
        "batch": BATCH,
        "targets": {"peak_rss_gib_at_50k": 2.0, "phate_landmark_seconds_at_50k": 300},
    }
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
