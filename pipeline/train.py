"""stage=train: learn each selected geometry on each task's targets, then export it to ship.

Every (task, geometry) pair is one Lightning run and one W&B run. Its checkpoints
live in a work folder beside the export, so a crashed run resumes from
`last.ckpt` (and continues the same W&B run); a finished export is stamped with
the config that made it and skipped when current. The export folder
`<run>/geometry/<task>/<name>/` holds `model.safetensors`, `config.json` and a
model card, and loads with `geosteer.load_geometry(path)`. Everything family-specific
(network, system, final metrics, figure, model card) lives in the family's module
(`pipeline.gaga`, `pipeline.innsteer`, `pipeline.bridge`), registered in
`pipeline.family.FAMILIES` under the name a geometry YAML's `family:` gives.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.multiprocessing import ProcessRaisedException
from torch.utils.data import DataLoader

from geosteer.data.store import ActivationStore
from geosteer.data.targets import PairwiseTargets, PointClouds, TargetError
from geosteer.data.tasks import Task
from geosteer.models.hub import load_geometry, model_card, read_config, seal
from geosteer.pipeline import bridge, gaga, innsteer  # noqa: F401  the built-in families register on import
from geosteer.pipeline.common import (
    CONFIG_DIR,
    SAFE_NAME,
    NonFiniteTraining,
    StageError,
    atomic_write_text,
    build,
    close_logger,
    git_sha,
    launched_rank,
    load_tasks,
    log,
    make_logger,
    temp_files_in,
    to_plain,
    trim_log,
    wait_for_rank_zero,
    worker_error,
)
from geosteer.pipeline.extract import warn_unextracted
from geosteer.pipeline.family import FAMILIES, GeometryFamily
from geosteer.pipeline.products import (
    STAMP,
    FingerprintCheckpoints,
    RunLayout,
    check_inside,
    check_product,
    check_provenance,
    current_result,
    drop_leftovers,
    finish_replace,
    lm_source,
    refuse_unrecorded,
    replace_dir,
    resume_checkpoint,
    stage_fingerprint,
    trained_seconds,
    trainer_facts,
    write_stamp,
)
from geosteer.pipeline.targets import cache_keys

GEOMETRY_SCHEMA_VERSION = 2  # 2: meta carries what steering needs (lm_pretrained, lm_revision, lm_shape, concepts)


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


class EpochLog(L.Callback):
    """A log line per validation: the progress bar shows only in a terminal, this also in the run's log file."""

    def __init__(self, what: str, monitor: str):
        self.what, self.monitor = what, monitor

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        if trainer.sanity_checking or not trainer.is_global_zero or value is None:
            return
        log.info("%s: epoch %d of at most %d, %s %.4g", self.what, trainer.current_epoch + 1, trainer.max_epochs,
                 self.monitor, float(value))  # fmt: skip


@functools.cache
def shipped_of(family: str) -> dict[str, frozenset[str]]:
    """Every shipped geometry YAML of `family`: its name → the settings it sets (none for a family registered
    elsewhere)."""
    shipped = {p.stem: OmegaConf.load(p) for p in sorted((CONFIG_DIR / "geometry").glob("*.yaml"))}
    return {name: frozenset(c) for name, c in shipped.items() if c.get("family") == family}


def selected_geometries(cfg: DictConfig) -> dict[str, Any]:
    geometries = to_plain(cfg.get("geometry")) or {}
    if not geometries:
        raise StageError("no geometry selected; pick one or more, e.g. geometry=gaga_out or geometry=[gaga_out,innsteer].")
    for name, g in geometries.items():
        if not SAFE_NAME.fullmatch(name):
            raise StageError(f"geometry name {name!r} becomes an export folder; use letters, digits and _.=,+- only.")
        if g.get("family") not in FAMILIES:
            raise StageError(f"geometry '{name}' has family {g.get('family')!r}; this geosteer trains {sorted(FAMILIES)}.")
        shipped = shipped_of(g["family"])  # what they all set, the family's code reads unguarded
        if shipped and (missing := sorted(frozenset.intersection(*shipped.values()) - set(g))):
            raise StageError(f"geometry '{name}' lacks {missing}, which every shipped geometry of family "
                             f"'{g['family']}' sets; start its YAML from one of them, e.g. configs/geometry/"
                             f"{next(iter(shipped))}.yaml.")  # fmt: skip
        FAMILIES[g["family"]].check(name, g)
        if FAMILIES[g["family"]].uses_pullback(g) and not cfg.targets.pullback.rank:
            raise StageError(
                f"geometry '{name}' trains against G_out's pullback factors, but targets.pullback.rank=0 computes "
                f"none. Keep targets.pullback.rank at its default (16) or another value ≥ 1, or drop '{name}' from "
                f"geometry=[...]."
            )
    return {name: capped(cfg, g) for name, g in geometries.items()}


def capped(cfg: DictConfig, g: dict[str, Any]) -> dict[str, Any]:
    """A geometry's settings as it trains: its max_epochs under `max_epochs_cap`."""
    return {**g, "max_epochs": min(g["max_epochs"], cfg.max_epochs_cap)} if cfg.max_epochs_cap is not None else g


def check_trained_against(cfg: DictConfig, geometries: dict[str, Any]) -> None:
    """Refuse a geometry whose encoder (what it trains against) is neither selected, to be trained first, nor
    exported in this run already: before any stage runs."""
    for name, g in geometries.items():
        for role in FAMILIES[g["family"]].trains_against:
            other = str(g.get(role))
            if not SAFE_NAME.fullmatch(other):  # an export's folder: it must be there
                if not (Path(other).expanduser() / "config.json").is_file():
                    raise StageError(f"geometry.{name}.{role}={other} holds no exported geometry (no config.json); "
                                     f"give the folder of an export, or a geometry of this run (e.g. gaga_out).")  # fmt: skip
                continue
            exported = any(RunLayout.of(cfg).geometries.glob(f"*/{other}/config.json"))
            if other not in geometries and not exported:
                known = (CONFIG_DIR / "geometry" / f"{other}.yaml").is_file()
                raise StageError(
                    f"geometry '{name}' trains against the {role} '{other}', which is neither selected nor exported in "
                    f"this run. {f'Select both (geometry=[{other},{name}]), or set' if known else 'Set'} "
                    f"geometry.{name}.{role} to a geometry of this run (e.g. gaga_out) or an export's folder (with a "
                    f"folder in it: /abs/dir or ./dir)."
                )


def steering_facts(store_path: Path, task: Task) -> dict[str, Any]:
    """What steering with an export needs besides its weights, from the store it was trained on: the LM (id, revision
    and shape, checked against a model at load), and the concept schema with each class's centroid in h."""
    with ActivationStore(store_path) as store:
        rows, schema, attrs = store.read(task.name, ["h", "label"]), store.schema(task.name), store.attrs
        lm = json.loads(attrs["config"])["model"]
        shape, sketch = json.loads(attrs.get("lm_shape", "null")), json.loads(attrs.get("lm_sketch", "null"))
    h = torch.from_numpy(rows["h"]).float()
    centroids = [h[rows["label"] == k].mean(0).tolist() if (rows["label"] == k).any() else None
                 for k in range(len(task.concepts))]  # fmt: skip
    concepts = {"values": list(schema.values), "variant_ids": [list(v) for v in schema.variant_ids], "centroids": centroids}
    return {"lm_pretrained": lm["pretrained"], "lm_revision": lm.get("revision") or "", "lm_shape": shape,
            "lm_sketch": sketch, "concepts": concepts}  # fmt: skip


def check_targets_config(cfg: DictConfig, task: Task, targets: PairwiseTargets, pullback: bool) -> None:
    """Refuse targets computed under other settings (`seed`, `targets.*`) than this config's: the geometry would
    train on another split or other distances than the config says, and eval, which makes the split from the
    config, would refuse it."""
    with ActivationStore(targets.store_path) as store:
        rows, store_fp = store.read(task.name, ["h", "q", "label"]), str(store.attrs["fingerprint"])
    keys = cache_keys(rows, to_plain(cfg.targets), cfg.seed, store_fp)
    attrs = targets.attrs
    have = {"split": attrs["split_key"], targets.target: attrs["key"]} | ({"pullback": attrs["pullback_key"]} if pullback else {})
    if stale := [name for name, key in have.items() if keys.get(name) != key]:
        raise StageError(
            f"{targets.path} holds {', '.join(stale)} computed under other settings than this config's (seed={cfg.seed}, "
            f"targets.*): a geometry trained on them would not be this config's. Make the targets for this config with "
            f"`pipeline stage=targets overwrite=true` (with the same overrides), or train with the settings they were "
            f"made with."
        )


def train_geometry(cfg: DictConfig, task: Task, name: str, g: dict[str, Any], targets_file: Path,
                   callbacks: Sequence[L.Callback] = ()) -> dict[str, Any]:  # fmt: skip
    """Train one geometry on one task, export it, and return its summary."""
    family = FAMILIES[g["family"]]
    pullback = family.uses_pullback(g)
    train = PairwiseTargets(targets_file, g["target"], "train", pullback=pullback, task=task.to_dict())
    val = PairwiseTargets(targets_file, g["target"], "val", pullback=pullback, task=task.to_dict())
    check_targets_config(cfg, task, train, pullback)
    attrs = train.attrs
    store = {"lm": str(attrs["model_name"]), "lm_fingerprint": str(attrs.get("lm_fingerprint", "")),
             "layer": int(attrs["layer"]), "store": str(attrs["activations_fingerprint"]), "split": str(attrs["split_key"])}  # fmt: skip
    needs = family.needs(cfg, task, name, g)  # {role: export folder}
    with ActivationStore(train.store_path) as st:  # where its LM's weights came from
        source = lm_source(st.attrs.get("model_pretrained"), st.attrs.get("model_revision"))
    for folder in needs.values():
        check_product(folder, "Train it again (`pipeline stage=train`), or copy it again.")
        check_provenance(folder, read_config(folder).get("meta") or {}, task.to_dict(), **store, source=source)
    needed = {role: export_facts(folder, RunLayout.of(cfg).root) for role, folder in needs.items()}
    facts = {"geometry": g, "target": attrs["key"], "split": attrs["split_key"], "seed": cfg.seed, "trainer": trainer_facts(cfg),
             "store": store["store"], "task": task.to_dict(), "schema_version": GEOMETRY_SCHEMA_VERSION}  # fmt: skip
    if pullback:
        facts["pullback"] = attrs["pullback_key"]
    if needed:  # retrain when what it trained against changes
        facts["needs"] = {role: f["fingerprint"] for role, f in needed.items()}
    fp = stage_fingerprint(facts, run_dir=cfg.paths.run_dir)
    g = {**g, "needs": needs} if needs else g
    out = RunLayout.of(cfg).geometry(task.name, name)
    check_inside(cfg.paths.run_dir, out)
    work = out.with_name(f".{name}.partial-{fp}")
    finish_replace(out, work / "export", fp)
    if not cfg.overwrite and not (out / STAMP).is_file() and (out / "config.json").is_file():
        meta = read_config(out).get("meta") or {}
        if meta.get("fingerprint") == fp and meta.get("digest"):  # this config's export, its record gone: its digest decides
            load_geometry(out)
            result = {"path": str(out), **(meta.get("metrics") or {}), "trainer": cfg.trainer.get("strategy", "auto")}
            if launched_rank()[0] == 0:
                write_stamp(out, "train", fp, result)
            log.info("geometry %s/%s: an export of this config without its record, whole by its digest: kept",
                     task.name, name)  # fmt: skip
            return result
    refuse_unrecorded(
        out, f"geometry {task.name}/{name}", cfg.overwrite, "eval.geometry_dir=... evaluates an export where it lies"
    )
    if (done := current_result(out, fp, f"geometry {task.name}/{name}", cfg.overwrite)) is not None:
        drop_leftovers(out, work)
        return done
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    L.seed_everything(cfg.seed, workers=True)
    x_train = train[torch.as_tensor(train.rows)]["x"]  # (N_train, d)
    meta = {"geometry": name, "family": g["family"], "target": g["target"], "target_scale": train.scale,
            "task": task.to_dict(), **store, **steering_facts(train.store_path, task), "schema_version": GEOMETRY_SCHEMA_VERSION,
            "fingerprint": str(fp)}  # fmt: skip
    if needed:
        meta["needs"] = needed
    model, ctor = family.build(g, x_train.shape[1], len(task.concepts), meta, cfg.seed)
    if getattr(type(model), "family", None) != g["family"]:  # load_geometry finds the class by this name
        raise StageError(f"geometry '{name}': family {g['family']!r} builds a {type(model).__name__}, registered as "
                         f"{getattr(type(model), 'family', None)!r}; subclass ShippedGeometry with family={g['family']!r}.")  # fmt: skip
    if (pca_dim := getattr(model, "pca_dim", None)) is not None and pca_dim > len(x_train):
        raise StageError(f"geometry '{name}': pca_dim={pca_dim} needs at least as many training rows, but task "
                         f"{task.name} has {len(x_train)}; lower geometry.{name}.pca_dim (e.g. to {len(x_train) // 2}) "
                         f"or add prompts to the task.")  # fmt: skip
    if (knn := g.get("knn")) is not None and knn >= len(x_train):  # the bridge's density hinge
        raise StageError(f"geometry.{name}.knn={knn} needs more training rows than neighbours, but task {task.name} "
                         f"has {len(x_train)}; lower it (e.g. geometry.{name}.knn=5).")  # fmt: skip
    model.fit_normalisation(x_train)
    system = family.system(model, g, train, len(task.concepts))
    data = PointCloudData(train, val, g["batch_size"], g["min_steps_per_epoch"], cfg.seed, g["num_workers"])

    checkpoints = work / "checkpoints"
    monitor = g.get("monitor") or family.monitor
    best = ModelCheckpoint(dirpath=checkpoints, filename="best", monitor=monitor, enable_version_counter=False)
    latest = ModelCheckpoint(dirpath=checkpoints, filename="last", enable_version_counter=False)  # every epoch
    stop = EarlyStopping(monitor=monitor, patience=g["patience"])
    logger = make_logger(cfg, f"train-{task.name}-{name}", run_id_file=work / "run_id")
    trainer = build(cfg, "trainer", max_epochs=g["max_epochs"], logger=logger,
                    callbacks=[best, latest, stop, EpochLog(f"{task.name}/{name}", monitor),
                               FingerprintCheckpoints(fp), *callbacks],
                    use_distributed_sampler=False,
                    default_root_dir=work)  # fmt: skip
    last = checkpoints / "last.ckpt"
    resume = resume_checkpoint(checkpoints, f"{task.name}/{name}", system, fp, best=True)
    resumed = torch.load(resume, map_location="cpu", weights_only=True) if resume else None
    before = trained_seconds(resumed)
    trim_log(logger, resumed)
    try:
        with temp_files_in(trainer, work / "tmp"):
            trainer.fit(system, datamodule=data, ckpt_path=resume, weights_only=True)
    except (NonFiniteTraining, ProcessRaisedException) as e:  # DDP workers' errors arrive wrapped
        if logger:
            close_logger(logger)
        unused = ("\nWith parameters the losses leave unused, spawned DDP takes "
                  "trainer.strategy=ddp_spawn_find_unused_parameters_true.") if "find_unused_parameters" in str(e) else ""  # fmt: skip
        raise StageError(f"training {task.name}/{name} failed: {worker_error(e)}{unused}\nIts checkpoints are kept in {work}; "
                         f"the next run resumes from the last one.") from e  # fmt: skip
    except Exception as e:  # Lightning's callbacks refuse a monitor that names no logged metric
        if logger:
            close_logger(logger)
        if monitor in str(e) and "metric" in str(e):
            raise StageError(f"geometry.{name}.monitor={monitor} names no metric that {task.name}/{name} logs "
                             f"({' '.join(str(e).split())[:300]}); use one of its val/ metrics, or null for "
                             f"{family.monitor}.") from e  # fmt: skip
        raise
    if launched_rank()[0] != 0:  # launched DDP: rank 0 evaluates and exports alone
        wait_for_rank_zero()
        return {"path": str(out), "rank": launched_rank()[0]}

    # Read back from the checkpoints, not the callbacks: spawned DDP workers keep their callbacks' state.
    final = torch.load(last, map_location="cpu", weights_only=True)
    kept = torch.load(
        checkpoints / "best.ckpt", map_location="cpu", weights_only=True
    )  # not best_model_path: the run may have moved
    system.load_state_dict(kept["state_dict"])
    model.eval()
    staging = work / "export"
    staging.mkdir(parents=True, exist_ok=True)
    metrics = family.evaluate(cfg, task, g, model, train, val, staging)  # also draws staging/training.png
    metrics.update({
        "monitor": monitor,
        "best_val": next(float(v["best_model_score"]) for v in kept["callbacks"].values()
                         if v.get("monitor") == monitor),
        "best_epoch": kept["epoch"],
        "epochs": final["epoch"] + 1,
        "steps": final["global_step"],
        "stopped_early": final["epoch"] + 1 < g["max_epochs"],
        "seconds": round(before + time.perf_counter() - start, 1),  # a resumed training's first part included
    })  # fmt: skip
    export(model, ctor, {**meta, "metrics": metrics, "git_sha": git_sha()}, family, staging)
    if logger:
        logger.log_metrics({f"final/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
                           step=metrics["steps"])  # fmt: skip
        if hasattr(logger, "log_image"):
            logger.log_image("figures/training", [str(staging / "training.png")])
        close_logger(logger, artifact=staging, artifact_name=f"{task.name}-{name}")
    result = {"path": str(out), **metrics, "trainer": cfg.trainer.get("strategy", "auto")}
    write_stamp(staging, "train", fp, result, home=out)  # before the move: the export never lies in place without its record
    replace_dir(staging, out)
    shutil.rmtree(work, ignore_errors=True)
    wait_for_rank_zero()
    log.info("%s/%s: %s after %d epochs (%.0f s)", task.name, name, family.headline(metrics), metrics["epochs"],
             metrics["seconds"])  # fmt: skip
    return result


def export_facts(folder: Path, run_dir: Path) -> dict[str, Any]:
    """Name, fingerprint and folder (relative to the run when inside it) of an exported geometry."""
    meta = read_config(folder).get("meta", {})
    where = folder.resolve()
    inside = where.is_relative_to(run_dir.resolve())
    return {"geometry": meta.get("geometry"), "fingerprint": meta.get("fingerprint"),
            "path": str(where.relative_to(run_dir.resolve()) if inside else folder)}  # fmt: skip


def export(model: nn.Module, ctor: dict[str, Any], meta: dict[str, Any], family: GeometryFamily, folder: Path) -> None:
    """Weights to model.safetensors, constructor arguments and facts to config.json, and a model card."""
    shipped = type(model)(**ctor, meta=meta)
    shipped.load_state_dict(model.state_dict())
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "README.md", model_card(ctor, meta, **family.card(ctor, meta)))  # first: save_pretrained keeps it
    shipped.save_pretrained(folder)
    seal(folder)


def run(cfg: DictConfig, callbacks: Sequence[L.Callback] = ()) -> dict:
    """Train and export every selected geometry on every task; `callbacks` join each Lightning trainer."""
    tasks = load_tasks(cfg)
    geometries = selected_geometries(cfg)
    check_trained_against(cfg, geometries)
    run = RunLayout.of(cfg)
    check_product(
        run.extract,
        "Re-run `pipeline stage=extract` with the overrides that made it (the same tasks=..., model=...): it makes the store again.",
    )
    warn_unextracted(cfg, "stage=train")
    check_product(run.targets, "Re-run `pipeline stage=targets` with the overrides that made them: it computes them again.")
    missing = [t.name for t in tasks if not run.targets_file(t.name).is_file()]
    if missing:
        raise StageError(f"no targets for {missing} under {run.targets}; run `pipeline stage=targets` first.")
    start = time.perf_counter()
    results: dict[str, dict[str, Any]] = {}
    # Families that train against other exports (the bridge against a GAGA encoder) go last.
    ordered = sorted(geometries.items(), key=lambda item: bool(FAMILIES[item[1]["family"]].trains_against))
    for task in tasks:
        for name, g in ordered:
            try:
                results.setdefault(task.name, {})[name] = train_geometry(
                    cfg, task, name, g, run.targets_file(task.name), callbacks
                )
            except TargetError as e:
                raise StageError(f"geometry {task.name}/{name}: {e}") from e
    if (rank := launched_rank()[0]) != 0:
        return {"dir": str(run.geometries), "rank": rank}
    summary = {t: {n: FAMILIES[geometries[n]["family"]].headline(r) for n, r in rs.items()} for t, rs in results.items()}
    log.info("trained geometries:\n%s", json.dumps(summary, indent=2))
    return {"dir": str(run.geometries), "summary": summary, "geometries": results,
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip
