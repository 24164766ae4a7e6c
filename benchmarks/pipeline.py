"""The whole pipeline, timed: `stage=all` on a fresh run folder, as `make run` runs it.

Every stage runs in this process, one after the other, through the same
`run(cfg)` the CLI calls; the seconds of each stage, of every (task, geometry)
pair (the train stage's own figure per export) and of every (task, method)
of the evaluation go to benchmarks/results/pipeline.json (pipeline-<model>.json
for a model other than the embedded one), with the quality
figures of each stage beside them, so a faster pipeline can be checked for
what it gives up. Run it with nothing else on the machine: a second busy
process slows 2-thread torch 10×.

    python -m benchmarks.pipeline [overrides ...]      # e.g. seed=1, tasks=[weekdays], model=smollm2
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from geosteer.pipeline.cli import PIPELINE, STAGES
from geosteer.pipeline.common import CONFIG_DIR, git_sha, to_plain
from geosteer.pipeline.products import check_run_dir

RESULTS = Path(__file__).parent / "results"


def main(overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["run_name=bench-pipeline", "logger=none", *overrides])
    check_run_dir(cfg)
    run_dir = Path(cfg.paths.run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)  # fresh: nothing is "current"
    stages, results = {}, {}
    start = time.perf_counter()
    for name in PIPELINE:
        if name == "lm" and not cfg.model.embedded:
            continue
        t0 = time.perf_counter()
        results[name] = STAGES[name](cfg)
        stages[name] = round(time.perf_counter() - t0, 1)
        print(f"{name}: {stages[name]:.1f} s", flush=True)
    total = round(time.perf_counter() - start, 1)

    geometries = {task: {g: r["seconds"] for g, r in rs.items()} for task, rs in results["train"]["geometries"].items()}
    per_task = json.loads((run_dir / "eval" / "results.json").read_text())["tasks"]
    methods = {task: {m: r.get("seconds") for m, r in t["methods"].items()} | {"alignment": t["alignment"]["seconds"],
                                                                             "own_point": t["own_point"].get("seconds")}
               for task, t in per_task.items()}  # fmt: skip
    quality = {
        "lm": {k: results["lm"][k] for k in ("accuracy", "swap_rate", "steps")} if "lm" in results else None,
        "geometries": results["train"]["summary"],
        "eval": {k: v for k, v in results["eval"].items() if k not in ("dir", "report", "seconds")},
    }
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
            "git_sha": git_sha(), "overrides": overrides, "model": to_plain(cfg.model.name)}  # fmt: skip
    out = {"meta": meta, "total_seconds": total, "stages": stages, "geometries": geometries, "eval": methods,
           "quality": quality}  # fmt: skip
    path = RESULTS / ("pipeline.json" if cfg.model.embedded else f"pipeline-{cfg.model.name}.json")
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"total {total / 60:.1f} min; wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
