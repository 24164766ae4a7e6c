"""Geometry training speed: steps/s at d = 256 and d = 4096 (batch 256), and the data-loading share of a step.

A synthetic ages task (its 4,725 prompts and K answer classes, h on a noisy
closed curve, q peaked at each point's class) goes through the real files:
the activation store (`data.store`), the targets stage's own per-task work
(`pipeline.targets.task_targets`: split, Hellinger, PHATE, pair std), and
then the real training loop (`pipeline.train.PointCloudData` feeding each
family's system in a Lightning Trainer), for GAGA-Out (Hellinger targets,
m = K+1 columns), GAGA-PHATE (PHATE targets, m = N columns) and INNSteer
(8 FrEIA AllInOneBlocks on raw h; classes from the Hellinger targets).

Lightning's SimpleProfiler splits each training step into fetching the next
batch from the DataLoader (`train_dataloader_next`) and the rest of the step
(`run_training_batch`: forward, target distances, backward, optimiser). The
data-loading share is their ratio, measured in one run. Target: ≤ 10 %.

Figures go to benchmarks/results/train.json.

    python -m benchmarks.train [--dims 256 4096] [--epochs 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import h5py
import lightning as L
import numpy as np
import torch
from lightning.pytorch.profilers import SimpleProfiler
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from geosteer.data.store import write_store, write_task_group
from geosteer.data.targets import PairwiseTargets
from geosteer.data.tasks import ConceptSchema, load_task
from geosteer.pipeline.common import CONFIG_DIR, to_plain
from geosteer.pipeline.targets import task_targets
from geosteer.pipeline.train import FAMILIES, PointCloudData

RESULTS = Path(__file__).parent / "results" / "train.json"
BATCH = 256


def synthetic_store(path: Path, d: int, seed: int = 0) -> None:
    """The ages prompts with synthetic h (N, d) on a noisy closed curve and q peaked near each point's class."""
    task = load_task("ages", CONFIG_DIR / "task")
    prompts = task.prompts()
    n, K = len(prompts), len(task.concepts)
    rng = np.random.default_rng(seed)
    angle = rng.uniform(0, 2 * np.pi, n)
    curve = np.stack([np.cos(angle), np.sin(angle), np.cos(2 * angle), np.sin(3 * angle)], 1)
    h = curve @ rng.standard_normal((4, d)) + 0.3 * rng.standard_normal((n, d))
    centres = 2 * np.pi * (np.arange(K) + 0.5) / K
    logits = np.concatenate([8 * np.cos(angle[:, None] - centres[None]), np.full((n, 1), -2.0)], 1)
    q = np.exp(logits - logits.max(1, keepdims=True))
    rows = {"h": h.astype(np.float32), "q": (q / q.sum(1, keepdims=True)).astype(np.float32),
            "top1": np.zeros(n, np.int64)}  # fmt: skip
    schema = ConceptSchema("ages", task.concepts, tuple((i,) for i in range(K)))
    write_store(path, {"fingerprint": f"synthetic-{d}", "layer": 0, "model_name": "synthetic"},
                lambda f: write_task_group(f, schema, task.to_dict(), prompts, rows, "none"))  # fmt: skip
    with h5py.File(path, "a") as f:  # labels from the curve, so that the split is stratified by them
        f["ages/label"][...] = np.floor(angle / (2 * np.pi) * K).astype(np.int32)


def synthetic_targets(folder: Path, d: int) -> Path:
    store = folder / "activations.h5"
    synthetic_store(store, d)
    with h5py.File(store, "r") as f:
        rows = {k: f["ages"][k][:] for k in ("h", "q", "label")}
    tcfg = to_plain(OmegaConf.load(CONFIG_DIR / "targets" / "default.yaml"))
    path = folder / "ages.h5"
    attrs = {"task": "ages", "layer": 0, "model_name": "synthetic", "activations": store.name,
             "activations_fingerprint": f"synthetic-{d}"}  # fmt: skip
    task_targets("ages", rows, path, tcfg, 0, attrs, tqdm(disable=True))
    return path


def one_case(targets_file: Path, geometry: str, epochs: int) -> dict:
    """Train one geometry for `epochs` (no validation) under the profiler; its step-time split."""
    g = to_plain(OmegaConf.load(CONFIG_DIR / "geometry" / f"{geometry}.yaml"))
    train = PairwiseTargets(targets_file, g["target"], "train")
    val = PairwiseTargets(targets_file, g["target"], "val")
    x = train[torch.as_tensor(train.rows)]["x"]
    L.seed_everything(0)
    family, K = FAMILIES[g["family"]], len(load_task("ages", CONFIG_DIR / "task").concepts)
    model, _ = family.build(g, x.shape[1], K, {}, 0)
    model.fit_normalisation(x)
    system = family.system(model, g, train, K)
    data = PointCloudData(train, val, BATCH, g["min_steps_per_epoch"], 0, g["num_workers"])
    profiler = SimpleProfiler(dirpath=targets_file.parent, filename=f"profile-{geometry}")  # not to stdout
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        num_sanity_val_steps=0, limit_val_batches=0, profiler=profiler)  # fmt: skip
    start = time.perf_counter()
    trainer.fit(system, datamodule=data)
    wall = time.perf_counter() - start
    durations = profiler.recorded_durations
    fetch = [v for k, vs in durations.items() if k.endswith("train_dataloader_next") for v in vs]
    step = [v for k, vs in durations.items() if k == "run_training_batch" for v in vs]
    fetch_s, step_s = float(np.median(fetch)), float(np.median(step))
    return {
        "steps": trainer.global_step,
        "steps_per_s": round(1 / (fetch_s + step_s), 1),
        "fetch_ms": round(1e3 * fetch_s, 3),
        "compute_ms": round(1e3 * step_s, 3),
        "data_loading_share": round(fetch_s / (fetch_s + step_s), 4),
        "wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 4096])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"batch": BATCH, "points": 4725, "threads": args.threads, "machine": platform.processor() or platform.machine()}
    cases = {}
    for d in args.dims:
        with tempfile.TemporaryDirectory() as tmp:
            path = synthetic_targets(Path(tmp), d)
            for geometry in ("gaga_out", "gaga_phate", "innsteer"):
                cases[f"{geometry}_d{d}"] = case = one_case(path, geometry, args.epochs)
                print(f"{geometry} d={d}: {case['steps_per_s']} steps/s, data loading "
                      f"{100 * case['data_loading_share']:.1f}% ({case['fetch_ms']} of "
                      f"{case['fetch_ms'] + case['compute_ms']:.2f} ms)")  # fmt: skip
    results["cases"] = cases
    results["max_data_loading_share"] = max(c["data_loading_share"] for c in cases.values())
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
