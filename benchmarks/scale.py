"""Data parallelism on one machine: 1 rank against 2 CPU ranks (gloo), for extraction and for GAGA training.

Both sides use every core: one rank runs torch on `--threads` threads, and each
of the two ranks gets half of them (Lightning's rule for DDP on the CPU). The
ratio (2-rank throughput ÷ 1-rank throughput) is measured in one run; the ideal
is 2× only when a single rank cannot use the second core.

- Extraction: `pipeline.extract.run` with trainer=cpu against trainer=ddp_sim, on
  random-weight Llamas over every task prompt. Throughput is the stage's own
  prompts/s over its parallel phase (model loading and process start-up aside);
  the stage's wall time, start-up included, is reported beside it.
- GAGA-Out training: the real system and data module (`pipeline.train`) on a
  synthetic ages store, in a Lightning Trainer with 1 or 2 devices. Throughput is
  training points/s from two runs of different length, so that process start-up
  and set-up cancel out: (E₂ − E₁) epochs × points per epoch ÷ (t₂ − t₁).

Figures go to benchmarks/results/scale.json.

    python -m benchmarks.scale [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from train import synthetic_targets  # benchmarks/train.py: the synthetic ages store and targets

from geosteer.data.targets import PairwiseTargets
from geosteer.data.tasks import load_task
from geosteer.models.task_lm import build_task_lm, build_word_tokenizer
from geosteer.pipeline import extract
from geosteer.pipeline.common import CONFIG_DIR, to_plain
from geosteer.pipeline.train import FAMILIES, PointCloudData

RESULTS = Path(__file__).parent / "results" / "scale.json"
TASKS = ["weekdays", "months", "letters", "ages"]
LMS = {  # build_task_lm sizes
    "embedded (hidden 128, 3 blocks)": dict(hidden_size=128, num_layers=3, num_heads=4, intermediate_size=256),
    "mid (hidden 512, 6 blocks)": dict(hidden_size=512, num_layers=6, num_heads=8, intermediate_size=1408),
}


def random_lm(folder: Path, size: dict) -> Path:
    """A random-weight Llama with the word tokenizer of every task, saved like any Hugging Face model."""
    prompts = [p for t in TASKS for p in load_task(t, CONFIG_DIR / "task").prompts()]
    tokenizer = build_word_tokenizer(p.text + " " + p.answer for p in prompts)
    torch.manual_seed(0)
    build_task_lm(tokenizer, **size).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def extraction(root: Path, lm: Path, trainer: str) -> dict:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("config", [f"paths.outputs={root}", f"run_name={trainer}", "logger=none", f"trainer={trainer}",
                                 f"model.pretrained={lm}", "model.embedded=false", "model.layer=1",
                                 f"tasks=[{','.join(TASKS)}]"])  # fmt: skip
    start = time.perf_counter()
    result = extract.run(cfg)
    return {"prompts_per_s": round(result["prompts_per_s"], 1), "stage_wall_s": round(time.perf_counter() - start, 2)}


def gaga_fit_seconds(targets_file: Path, devices: int, epochs: int) -> tuple[float, int]:
    """Wall time of `epochs` of GAGA-Out training on `devices` CPU ranks, and the points one epoch trains on."""
    g = to_plain(OmegaConf.load(CONFIG_DIR / "geometry" / "gaga_out.yaml"))
    train, val = (PairwiseTargets(targets_file, g["target"], split) for split in ("train", "val"))
    x = train[torch.as_tensor(train.rows)]["x"]
    L.seed_everything(0)
    K = len(load_task("ages", CONFIG_DIR / "task").concepts)
    model, _ = FAMILIES["gaga"].build(g, x.shape[1], K, {}, 0)
    model.fit_normalisation(x)
    system = FAMILIES["gaga"].system(model, g, train, K)
    data = PointCloudData(train, val, g["batch_size"], g["min_steps_per_epoch"], 0, g["num_workers"])
    strategy = "ddp_spawn" if devices > 1 else "auto"
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy=strategy, max_epochs=epochs, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, num_sanity_val_steps=0, limit_val_batches=0)  # fmt: skip
    start = time.perf_counter()
    trainer.fit(system, datamodule=data)
    steps_per_epoch = max(g["min_steps_per_epoch"], -(-len(train) // (devices * g["batch_size"])))
    return time.perf_counter() - start, steps_per_epoch * devices * g["batch_size"]


def training(targets_file: Path, devices: int, epochs: tuple[int, int]) -> dict:
    (t1, points), (t2, _) = (gaga_fit_seconds(targets_file, devices, e) for e in epochs)
    return {"points_per_s": round((epochs[1] - epochs[0]) * points / (t2 - t1), 1), "points_per_epoch": points,
            "fit_wall_s": [round(t1, 2), round(t2, 2)]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=int, nargs=2, default=[4, 24])
    parser.add_argument("--dims", type=int, nargs="+", default=[128, 1024])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"threads": args.threads, "machine": platform.processor() or platform.machine(), "extract": {},
               "train_gaga_out": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for name, size in LMS.items():
            lm = random_lm(Path(tmp) / f"lm-{size['hidden_size']}", size)
            one, two = (extraction(Path(tmp) / f"x-{size['hidden_size']}", lm, t) for t in ("cpu", "ddp_sim"))
            ratio = round(two["prompts_per_s"] / one["prompts_per_s"], 2)
            results["extract"][name] = {"1_rank": one, "2_ranks": two, "ratio": ratio}
            print(f"extract, {name}: {one['prompts_per_s']} → {two['prompts_per_s']} prompts/s, {ratio}×")
        for d in args.dims:
            folder = Path(tmp) / f"t-{d}"
            folder.mkdir()
            path = synthetic_targets(folder, d)
            one, two = (training(path, devices, tuple(args.epochs)) for devices in (1, 2))
            ratio = round(two["points_per_s"] / one["points_per_s"], 2)
            results["train_gaga_out"][f"d={d}"] = {"1_rank": one, "2_ranks": two, "ratio": ratio}
            print(f"GAGA-Out training, d={d}: {one['points_per_s']} → {two['points_per_s']} points/s, {ratio}×")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
