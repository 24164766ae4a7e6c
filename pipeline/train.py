"""stage=train: learn each selected geometry on each task's targets, then export it to ship.

Every (task, geometry) pair is one Lightning run and one W&B run. Its checkpoints
live in a work folder beside the export, so a crashed run resumes from
`last.ckpt` (and continues the same W&B run); a finished export is stamped with
the config that made it and skipped when current. The export folder
`<run>/geometry/<task>/<name>/` holds `model.safetensors`, `config.json` and a
model card, and loads with `GAGA.from_pretrained(path)`.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib
import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from data.targets import PairwiseTargets, PointClouds, TargetError, targets_path
from data.tasks import Task
from models.gaga import GAGA
from pipeline.common import (
    StageError,
    atomic_write_text,
    close_logger,
    current_result,
    fingerprint,
    git_sha,
    load_tasks,
    log,
    make_logger,
    replace_dir,
    to_plain,
    write_stamp,
)
from pipeline.gaga import GAGASystem, distance_quality

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

GEOMETRY_SCHEMA_VERSION = 1
FAMILIES = ("gaga",)


class PointCloudData(L.LightningDataModule):
    """Seeded point-cloud batches of one task's targets; each DDP rank draws disjoint rows.

    An epoch is `ceil(n_train / (world_size · B))` steps, at least `min_steps`, so that
    small tasks still take several optimiser steps between validations. Validation
    walks the whole val split in fixed chunks of B on every rank.
    """

    def __init__(self, train: PairwiseTargets, val: PairwiseTargets, batch_size: int, min_steps: int, seed: int,
                 num_workers: int = 0):  # fmt: skip
        super().__init__()
        self.train, self.val = train, val
        self.batch_size, self.min_steps, self.seed, self.num_workers = batch_size, min_steps, seed, num_workers

    def _loader(self, data: PairwiseTargets, sampler) -> DataLoader:
        workers = {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0}
        return DataLoader(data, sampler=sampler, batch_size=None, **workers)

    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        steps = max(self.min_steps, math.ceil(len(self.train) / (world * self.batch_size)))
        sampler = PointClouds(self.train.rows, self.batch_size, steps, self.seed, rank, world)
        return self._loader(self.train, sampler)

    def val_dataloader(self) -> DataLoader:
        rows = torch.as_tensor(self.val.rows, dtype=torch.long)
        return self._loader(self.val, list(rows.split(self.batch_size)))


def selected_geometries(cfg: DictConfig) -> dict[str, Any]:
    geometries = to_plain(cfg.get("geometry")) or {}
    if not geometries:
        raise StageError("no geometry selected; pick one or more, e.g. geometry=gaga_out or geometry=[gaga_out,gaga_phate].")
    for name, g in geometries.items():
        if g.get("family") not in FAMILIES:
            raise StageError(f"geometry '{name}' has family {g.get('family')!r}; this geosteer trains {FAMILIES}.")
        if g["loss"]["pointwise"] and g["target"] != "hellinger":
            raise StageError(
                f"geometry '{name}': loss.pointwise={g['loss']['pointwise']} fits √q, which needs target=hellinger "
                f"(it is {g['target']}); set geometry.{name}.loss.pointwise=0."
            )
        if cfg.max_epochs_cap is not None:
            g["max_epochs"] = min(g["max_epochs"], cfg.max_epochs_cap)
    return geometries


def build_gaga(g: dict[str, Any], d: int, K: int, meta: dict[str, Any]) -> tuple[GAGA, dict[str, Any]]:
    """The untrained network of a GAGA geometry config and its constructor arguments."""
    ctor = {
        "input_dim": d,
        "latent_dim": g["latent_dim"] or K,
        "hidden": list(g["hidden"]),
        "pca_dim": g["pca_dim"],
        "readout_dim": K + 1 if g["loss"]["pointwise"] else None,
    }
    if ctor["pca_dim"] is not None and ctor["pca_dim"] > d:
        raise StageError(f"pca_dim={ctor['pca_dim']} exceeds the activation width d={d}; set pca_dim to at most {d}.")
    return GAGA(**ctor, meta=meta), ctor


def train_geometry(cfg: DictConfig, task: Task, name: str, g: dict[str, Any], targets_file: Path,
                   callbacks: Sequence[L.Callback] = ()) -> dict[str, Any]:  # fmt: skip
    """Train one geometry on one task, export it, and return its summary."""
    train = PairwiseTargets(targets_file, g["target"], "train")
    val = PairwiseTargets(targets_file, g["target"], "val")
    attrs = train.attrs
    trainer_cfg = {k: v for k, v in to_plain(cfg.trainer).items() if k not in ("log_every_n_steps",)}
    fp = fingerprint({"geometry": g, "target": attrs["key"], "split": attrs["split_key"], "seed": cfg.seed,
                      "trainer": trainer_cfg})  # fmt: skip
    out = Path(cfg.paths.run_dir) / "geometry" / task.name / name
    if (done := current_result(out, fp, f"geometry {task.name}/{name}", cfg.overwrite)) is not None:
        return done
    work = out.with_name(f".{name}.partial-{fp}")
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    L.seed_everything(cfg.seed, workers=True)
    x_train = train[torch.as_tensor(train.rows)]["x"]  # (N_train, d)
    K = len(task.concepts)
    meta = {"geometry": name, "family": g["family"], "target": g["target"], "target_scale": train.scale,
            "task": task.to_dict(), "lm": str(attrs["model_name"]), "layer": int(attrs["layer"]),
            "schema_version": GEOMETRY_SCHEMA_VERSION, "fingerprint": fp}  # fmt: skip
    model, ctor = build_gaga(g, x_train.shape[1], K, meta)
    model.fit_normalisation(x_train)
    loss = g["loss"]
    system = GAGASystem(model, train.scale, **loss, **g["optim"], coords_are_hellinger=g["target"] == "hellinger")
    data = PointCloudData(train, val, g["batch_size"], g["min_steps_per_epoch"], cfg.seed, g["num_workers"])

    checkpoints = work / "checkpoints"
    best = ModelCheckpoint(dirpath=checkpoints, filename="best", monitor="val/dist", enable_version_counter=False)
    latest = ModelCheckpoint(dirpath=checkpoints, filename="last", enable_version_counter=False)  # every epoch
    stop = EarlyStopping(monitor="val/dist", patience=g["patience"])
    logger = make_logger(cfg, f"train-{task.name}-{name}", run_id_file=work / "run_id")
    trainer = instantiate(cfg.trainer, max_epochs=g["max_epochs"], logger=logger,
                          callbacks=[best, latest, stop, *callbacks], use_distributed_sampler=False,
                          default_root_dir=work)  # fmt: skip
    last = checkpoints / "last.ckpt"
    if last.is_file():
        log.info("resuming %s/%s from %s", task.name, name, last)
    trainer.fit(system, datamodule=data, ckpt_path=last if last.is_file() else None, weights_only=True)

    # Read back from the checkpoints, not the callbacks: spawned DDP workers keep their callbacks' state.
    final = torch.load(last, map_location="cpu", weights_only=True)
    kept = torch.load(best.best_model_path or checkpoints / "best.ckpt", map_location="cpu", weights_only=True)
    system.load_state_dict(kept["state_dict"])
    model.eval()
    with torch.no_grad():
        z = model.encode(train[torch.arange(len(train.labels))]["x"])  # (N, k), every store row
    val_rows = torch.as_tensor(val.rows)
    val_coords = val[val_rows]["coords"]  # (N_val, m)
    quality = distance_quality(z[val_rows], val_coords)
    metrics = {
        "val_spearman": quality["spearman"],
        "val_pearson": quality["pearson"],
        "best_val_dist": next(float(v["best_model_score"]) for v in kept["callbacks"].values()
                              if v.get("monitor") == "val/dist"),  # fmt: skip
        "best_epoch": kept["epoch"],
        "epochs": final["epoch"] + 1,
        "steps": final["global_step"],
        "stopped_early": final["epoch"] + 1 < g["max_epochs"],
        "seconds": round(time.perf_counter() - start, 1),
    }
    staging = work / "export"
    figure_path = staging / "training.png"
    figure(task, name, z, train.labels, val_rows, val_coords, train.scale, metrics, figure_path)
    export(model, ctor, {**meta, "metrics": metrics, "git_sha": git_sha()}, staging)
    if logger:
        logger.log_metrics({f"final/{k}": float(v) for k, v in metrics.items()})
        if hasattr(logger, "log_image"):
            logger.log_image("figures/training", [str(figure_path)])
        close_logger(logger, artifact=staging, artifact_name=f"{task.name}-{name}")
    result = {"path": str(out), **metrics, "trainer": cfg.trainer.get("strategy", "auto")}
    replace_dir(staging, out)
    write_stamp(out, "train", fp, result)
    shutil.rmtree(work, ignore_errors=True)
    log.info("%s/%s: val Spearman %.3f, Pearson %.3f after %d epochs (%.0f s)", task.name, name,
             metrics["val_spearman"], metrics["val_pearson"], metrics["epochs"], metrics["seconds"])  # fmt: skip
    return result


def export(model: GAGA, ctor: dict[str, Any], meta: dict[str, Any], folder: Path) -> None:
    """Weights to model.safetensors, constructor arguments and facts to config.json, and a model card."""
    shipped = GAGA(**ctor, meta=meta)
    shipped.load_state_dict(model.state_dict())
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "README.md", model_card(ctor, meta))  # written first: save_pretrained keeps it
    shipped.save_pretrained(folder)


def model_card(ctor: dict[str, Any], meta: dict[str, Any]) -> str:
    m, task = meta["metrics"], meta["task"]
    return f"""---
library_name: geosteer
tags: [geosteer, gaga, steering-geometry, {task["name"]}]
---
# {meta["geometry"]}: a learned steering geometry of {meta["lm"]} on {task["name"]}

A GAGA encoder/decoder (Sun et al. 2025) trained by geosteer on the residual
stream of `{meta["lm"]}` after decoder block {meta["layer"]}, at the last prompt
token of the `{task["name"]}` task ({len(task["values"])} values, {task["topology"]}).
Its encoder E: R^{ctor["input_dim"]} → R^{ctor["latent_dim"]} matches latent distances to
**{meta["target"]}** target distances (divided by their training-pair std,
{meta["target_scale"]:.4g}); the pullback `J_Eᵀ J_E` of E is the steering metric.

| | |
|---|---|
| ambient space | {"PCA(%d) of h" % ctor["pca_dim"] if ctor["pca_dim"] else "raw h"} |
| hidden widths | {ctor["hidden"]} |
| val Spearman, latent vs target distances | {m["val_spearman"]:.4f} |
| val Pearson | {m["val_pearson"]:.4f} |
| best val L_dist | {m["best_val_dist"]:.4g} |
| epochs / steps | {m["epochs"]} / {m["steps"]} |
| git SHA | {meta.get("git_sha")} |

![training](training.png)

## Use

```python
from models.gaga import GAGA

geometry = GAGA.from_pretrained("path/to/this/folder")  # safetensors + config.json, never unpickles
geometry.check_compatible(d=h.shape[-1], layer={meta["layer"]})
z = geometry.encode(h)  # h: (B, {ctor["input_dim"]}) activations at block {meta["layer"]} → (B, {ctor["latent_dim"]})
```

`config.json` holds the constructor arguments and, under `meta`, the LM, layer,
task schema, target and training metrics.
"""


def figure(task: Task, name: str, z: torch.Tensor, labels: np.ndarray, val_rows: torch.Tensor,
           val_coords: torch.Tensor, scale: float, metrics: dict[str, Any], path: Path) -> None:  # fmt: skip
    """Latent scatter (3-D when k ≥ 3) coloured by answer class, and val target vs latent distances."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = plt.figure(figsize=(11, 4.8))
    z3 = z.double()
    if z3.shape[1] > 3:  # the top-3 principal directions of the latent
        z3 = (z3 - z3.mean(0)) @ torch.linalg.svd(z3 - z3.mean(0), full_matrices=False).Vh[:3].T
    cmap = "twilight" if task.topology == "cyclic" else "viridis"
    if z3.shape[1] >= 3:
        ax = fig.add_subplot(1, 2, 1, projection="3d")
        sc = ax.scatter(*z3[:, :3].T.numpy(), c=labels, cmap=cmap, s=6)
    else:
        ax = fig.add_subplot(1, 2, 1)
        sc = ax.scatter(z3[:, 0].numpy(), z3[:, -1].numpy(), c=labels, cmap=cmap, s=6)
    fig.colorbar(sc, ax=ax, shrink=0.7, label="answer class")
    ax.set_title(f"{task.name} / {name}: latent")
    ax = fig.add_subplot(1, 2, 2)
    latent, target = torch.pdist(z[val_rows]).numpy(), (torch.pdist(val_coords) / scale).numpy()
    keep = np.random.default_rng(0).permutation(len(latent))[:20000]
    ax.scatter(target[keep], latent[keep], s=2, alpha=0.3)
    lim = max(target.max(), latent.max())
    ax.plot([0, lim], [0, lim], "k--", lw=0.8)
    ax.set(xlabel="target distance d̂", ylabel="latent distance", title=f"val pairs: Spearman {metrics['val_spearman']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: DictConfig, callbacks: Sequence[L.Callback] = ()) -> dict:
    """Train and export every selected geometry on every task; `callbacks` join each Lightning trainer."""
    tasks = load_tasks(cfg)
    geometries = selected_geometries(cfg)
    targets_dir = Path(cfg.paths.run_dir) / "targets"
    missing = [t.name for t in tasks if not targets_path(targets_dir, t.name).is_file()]
    if missing:
        raise StageError(f"no targets for {missing} under {targets_dir}; run `pipeline stage=targets` first.")
    start = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    for task in tasks:
        for name, g in geometries.items():
            try:
                results.setdefault(task.name, {})[name] = train_geometry(
                    cfg, task, name, g, targets_path(targets_dir, task.name), callbacks
                )
            except TargetError as e:
                raise StageError(f"geometry {task.name}/{name}: {e}") from e
    summary = {t: {n: round(r["val_spearman"], 4) for n, r in rs.items()} for t, rs in results.items()}
    log.info("val Spearman, latent vs target distances:\n%s", json.dumps(summary, indent=2))
    return {"dir": str(Path(cfg.paths.run_dir) / "geometry"), "val_spearman": summary, "geometries": results,
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
