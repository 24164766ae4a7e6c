"""stage=targets: Hellinger and PHATE target coordinates of every task (docs/method.md §3), and the output
pullback J_s = ∂√q/∂h at every row in its own prompt (§6), which geometries trained on G_out fit (GAGA-Jac).

Each group of a task's targets file carries a cache key, a hash of its input
arrays and parameters, and a digest of its own content: a re-run recomputes
only the groups whose key changed or whose content is not as written, and a
task whose groups all match is left untouched. A task's file is written
atomically once all its groups are done, so a crash loses at most that task.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from geosteer.data.store import ActivationStore, put_in_place
from geosteer.data.targets import (
    TARGET_NAMES,
    TargetError,
    digest,
    hellinger_coords,
    pair_distance_std,
    phate_coords,
    pullback_factors,
    read_groups,
    replaced_groups,
    stratified_split,
    write_targets,
)
from geosteer.data.tasks import Task
from geosteer.models.metrics import OutputPullback
from geosteer.models.tail import CarrierTail
from geosteer.pipeline.common import close_logger, lm_of_store, load_tasks, log, make_logger, to_plain
from geosteer.pipeline.extract import warn_unextracted
from geosteer.pipeline.products import (
    STAMP,
    Fingerprint,
    RunLayout,
    check_inside,
    check_product,
    current_result,
    fingerprint,
    stage_fingerprint,
    write_stamp,
)

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)


def check_finite(task: str, rows: dict[str, np.ndarray], store: Path) -> None:
    bad = ~(np.isfinite(rows["h"]).all(1) & np.isfinite(rows["q"]).all(1))
    if bad.any():
        raise TargetError(
            f"task '{task}': {int(bad.sum())} of {len(bad)} rows of {store} hold NaN or Inf "
            f"(first at row {int(np.flatnonzero(bad)[0])}). The LM overflowed at model.dtype, or its weights hold "
            f"NaN: re-extract with model.dtype=float32 (or bfloat16) and overwrite=true, or check the LM."
        )


def split_key(labels: np.ndarray, val_fraction: float, seed: int) -> str:
    """What the train/val split is made from: the labels, the fraction and the seed (`stratified_split`)."""
    return fingerprint({"labels": digest(labels), "val_fraction": val_fraction, "seed": seed})


def targets_fingerprint(tasks: list[Task], tcfg: dict[str, Any], seed: int, store_fp: str) -> Fingerprint:
    """What the targets stage's product depends on; phate.n_jobs changes speed, not numbers: held at its default."""
    held = {**tcfg, "phate": {**tcfg["phate"], "n_jobs": -1}} if "n_jobs" in tcfg.get("phate", {}) else tcfg
    return stage_fingerprint({"tasks": [t.to_dict() for t in tasks], "targets": held, "seed": seed, "store": store_fp})


def cache_keys(rows: dict[str, np.ndarray], tcfg: dict[str, Any], seed: int, store_fp: str) -> dict[str, str]:
    """What each group is computed from: its input arrays and parameters (the pullback: the store, so the LM)."""
    split = split_key(rows["label"], tcfg["val_fraction"], seed)
    pairs = {"split": split, "pair_samples": tcfg["pair_samples"]}
    phate = {k: v for k, v in tcfg["phate"].items() if k != "n_jobs"}  # n_jobs changes speed, not numbers
    keys = {
        "split": split,
        "hellinger": fingerprint({"q": digest(rows["q"]), **pairs}),
        "phate": fingerprint({"h": digest(rows["h"]), **pairs, **phate, "seed": seed}),
    }
    if tcfg["pullback"]["rank"]:
        keys["pullback"] = fingerprint({"store": store_fp, "h": digest(rows["h"]), "rank": tcfg["pullback"]["rank"]})
    return keys


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic torch kernels for the block, whatever was set before (Lightning's trainer sets them for the rest
    of a process): the reverse pass's scatter-adds otherwise sum in another order, and a targets file made in a
    fresh process would differ in the last bits from one made after a training run."""
    before, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn)


@torch.no_grad()
def output_pullback(lm, tokenizer, layer: int, variant_ids, rows, rank: int, max_batch: int) -> dict[str, Any]:
    """The `pullback` group: each row's J_s = ∂√q/∂h in its own prompt, kept as its top-`rank` rows F (FᵀF ≈ G_out)."""
    start = time.perf_counter()
    dtype, device = next(lm.parameters()).dtype, next(lm.parameters()).device
    factors, kept = [], []
    for s in range(0, len(rows["h"]), max_batch):
        tail = CarrierTail.of_prompts(lm, tokenizer, layer, rows["prompt"][s : s + max_batch])
        h = torch.from_numpy(rows["h"][s : s + max_batch]).to(dtype=dtype, device=device)
        with deterministic():
            J = OutputPullback(tail, variant_ids, carrier=torch.arange(len(h)), max_batch=max_batch).jacobian(h)  # (b, K+1, d)
        F, k = pullback_factors(J.float().cpu(), rank)
        factors.append(F)
        kept.append(k)
    kept = torch.cat(kept)
    attrs = {"rank": factors[0].shape[1], "carrier": "own prompt", "trace_kept_min": float(kept.min()),
             "trace_kept_mean": float(kept.mean()), "seconds": time.perf_counter() - start}  # fmt: skip
    return {"factor": torch.cat(factors).numpy(), "attrs": attrs}


def compute_group(name: str, rows, split: dict[str, np.ndarray], tcfg: dict[str, Any], seed: int) -> dict[str, Any]:
    """One target group: coordinates, the pair-distance std over training pairs, and its parameters."""
    start = time.perf_counter()
    if name == "hellinger":
        coords, attrs, extra = hellinger_coords(rows["q"]), {}, {}
    else:
        p = tcfg["phate"]
        res = phate_coords(rows["h"], seed=seed, **p)
        coords, extra = res.coords, {"entropy": res.entropy}
        attrs = {**{k: "none" if v is None else v for k, v in p.items()}, "l2_normalise": True}
        attrs |= {"t": res.t, "t_auto": res.t_auto, "landmarks": res.landmarks, "components": res.components}
    std = pair_distance_std(coords, split["train"], tcfg["pair_samples"], seed)
    seconds = time.perf_counter() - start
    return {"coords": coords, **extra, "attrs": {**attrs, "pair_std": std, "dim": coords.shape[1], "seconds": seconds}}


def task_targets(task: str, rows, path: Path, tcfg: dict[str, Any], seed: int, file_attrs, bar,
                 pullback=None) -> tuple[dict, dict]:  # fmt: skip
    """Bring one task's targets file up to date; returns its summary and its groups. `pullback()` computes the
    output-pullback group when it is due."""
    keys = cache_keys(rows, tcfg, seed, file_attrs["activations_fingerprint"])
    groups, current = read_groups(path, keys, file_attrs)
    cached = set(groups)
    if "split" not in groups:
        train, val = stratified_split(rows["label"], tcfg["val_fraction"], seed)
        attrs = {"val_fraction": tcfg["val_fraction"], "seed": seed}
        groups["split"] = {"train": train, "val": val, "attrs": attrs}
    for name in TARGET_NAMES:
        if name not in groups:
            bar.set_postfix_str(f"{task}: {name}")
            groups[name] = compute_group(name, rows, groups["split"], tcfg, seed)
        bar.update()
    if "pullback" in keys:
        if "pullback" not in groups:
            bar.set_postfix_str(f"{task}: output pullback")
            groups["pullback"] = pullback()
        bar.update()
    for name, key in keys.items():
        groups[name]["attrs"]["key"] = key
    if not current:
        write_targets(path, file_attrs, groups)
    summary = {"n": len(rows["h"]), "n_train": len(groups["split"]["train"]), "n_val": len(groups["split"]["val"])}
    for name in TARGET_NAMES:
        a = groups[name]["attrs"]
        summary[name] = {k: _plain(a[k]) for k in ("dim", "pair_std", "seconds", "t", "landmarks", "components") if k in a}
        summary[name]["cached"] = name in cached
    if "pullback" in keys:
        a = groups["pullback"]["attrs"]
        summary["pullback"] = {k: _plain(a[k]) for k in ("rank", "trace_kept_min", "seconds")} | {"cached": "pullback" in cached}
    return summary, groups


def _plain(v):
    return v.item() if isinstance(v, np.generic) else v


def figure(task: str, labels: np.ndarray, groups, cyclic: bool, path: Path, max_points: int = 5000) -> None:
    """Von Neumann entropy with the chosen t, and PCA-2 of both targets coloured by answer class.

    Above `max_points` rows, a seeded sample is drawn: enough to see the shape, bounded memory.
    """
    from sklearn.decomposition import PCA

    rows = np.sort(np.random.default_rng(0).permutation(len(labels))[:max_points])

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    entropy, t = groups["phate"]["entropy"], groups["phate"]["attrs"]["t"]
    if entropy.size:
        axes[0].plot(entropy)
        axes[0].scatter([t], [entropy[t]], c="k", marker="*", s=80, zorder=3)
    axes[0].set(title=f"von Neumann entropy, t = {t}", xlabel="t", ylabel="entropy")
    cmap = "twilight" if cyclic else "viridis"
    for ax, name in zip(axes[1:], ("hellinger", "phate")):
        xy = PCA(2, svd_solver="randomized", random_state=0).fit_transform(groups[name]["coords"][rows])
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=labels[rows], cmap=cmap, s=4)
        ax.set(title=f"{name} coordinates, PCA-2", xticks=[], yticks=[])
    fig.colorbar(sc, ax=axes[2], label="answer class")
    fig.suptitle(f"{task}: distance targets")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    put_in_place(tmp, path)


def run(cfg: DictConfig) -> dict:
    """Write `<run_dir>/targets/<task>.h5` for every task, recomputing only what changed."""
    tasks = load_tasks(cfg)
    run = RunLayout.of(cfg)
    out, store_path = run.targets, run.store
    tcfg = to_plain(cfg.targets)
    summary, figures = {}, {}
    start = time.perf_counter()
    check_product(
        run.extract,
        "Re-run `pipeline stage=extract` with the overrides that made it (the same tasks=..., model=...): it makes the store again.",
    )
    warn_unextracted(cfg, "stage=targets")
    check_inside(run.root, out)
    with ActivationStore(store_path) as store:
        file_attrs = {
            "activations": os.path.relpath(store_path, out),
            "activations_fingerprint": store.attrs["fingerprint"],
            "layer": store.attrs["layer"],
            "model_name": store.attrs["model_name"],
            "lm_fingerprint": store.attrs.get("lm_fingerprint", ""),  # the embedded LM's training
        }
        for task in tasks:
            store.check_task(task.to_dict())
        fp = targets_fingerprint(tasks, tcfg, cfg.seed, str(store.attrs["fingerprint"]))
        if (done := current_result(out, fp, "the distance targets", cfg.overwrite, remove_damaged=False)) is not None:
            # each group's content digest is checked as it is read: a damaged one is computed again
            return done
        unrecorded = not cfg.overwrite and not (out / STAMP).is_file()  # files copied or kept there by hand
        for task in tasks:  # what the data can refuse is refused before any targets file is written
            labels = store.read(task.name, ["label"])["label"]
            path = run.targets_file(task.name)
            if unrecorded and path.is_file():
                keys = cache_keys(
                    store.read(task.name, ["h", "q", "label"]), tcfg, cfg.seed, file_attrs["activations_fingerprint"]
                )
                if stale := replaced_groups(path, keys):
                    raise TargetError(
                        f"{path} holds targets ({', '.join(stale)}) made from other inputs or settings, and {out} has "
                        f"no {STAMP}, the record its stage writes (copied or kept there by hand): this command would "
                        f"replace them. Move the file elsewhere, or pass overwrite=true to replace them."
                    )
            stratified_split(labels, tcfg["val_fraction"], cfg.seed)
            if len(labels) < (knn := tcfg["phate"]["knn"]) + 1:
                raise TargetError(f"task '{task.name}': {len(labels)} points, but PHATE with knn={knn} needs at least "
                                  f"{knn + 1}; add prompts (templates or values) or lower targets.phate.knn.")  # fmt: skip
        with tqdm(total=(len(TARGET_NAMES) + bool(tcfg["pullback"]["rank"])) * len(tasks), unit="target", desc="targets") as bar:
            for task in tasks:
                store.check_task(task.to_dict())
                rows = store.read(task.name, ["h", "q", "label", "prompt"])
                check_finite(task.name, rows, store_path)
                schema, p = store.schema(task.name), tcfg["pullback"]

                def pullback():
                    lm, tokenizer = lm_of_store(cfg, store.attrs, "the output-pullback targets")
                    return output_pullback(lm, tokenizer, int(store.attrs["layer"]), schema.variant_ids, rows, p["rank"],
                                           p["max_batch"])  # fmt: skip

                try:
                    summary[task.name], groups = task_targets(
                        task.name, rows, run.targets_file(task.name), tcfg, cfg.seed,
                        {**file_attrs, "task": task.name, "task_definition": json.dumps(task.to_dict())}, bar, pullback,
                    )  # fmt: skip
                except TargetError as e:
                    raise TargetError(f"task '{task.name}': {e}") from None
                s = summary[task.name]
                log.info(
                    "targets %s: N=%d, hellinger %s, phate %s t=%d %s (%.1f s)%s",
                    *(task.name, s["n"], s["hellinger"]["dim"], s["phate"]["dim"], s["phate"]["t"]),
                    *("landmarks" if s["phate"]["landmarks"] else "exact", s["phate"]["seconds"]),
                    " [cached]" if s["phate"]["cached"] else "",
                )
                if s["phate"]["components"] > 1:
                    log.warning(
                        "targets %s: the kNN graph has %d connected components; PHATE distances between them "
                        "saturate. Raise targets.phate.knn if the task's classes should connect.",
                        task.name, s["phate"]["components"],
                    )  # fmt: skip
                if cfg.targets.figures:
                    figures[task.name] = out / f"{task.name}.png"
                    figure(task.name, rows["label"], groups, task.topology == "cyclic", figures[task.name])
    result = {"dir": str(out), "tasks": summary, "seconds": round(time.perf_counter() - start, 2)}
    result["figures"] = {k: str(v) for k, v in figures.items()}
    if logger := make_logger(cfg, "targets"):
        metrics = {f"targets/{t}/{g}_{k}": v for t, s in summary.items() for g in TARGET_NAMES for k, v in s[g].items()}
        logger.log_metrics({k: float(v) for k, v in metrics.items()})
        if hasattr(logger, "log_image") and figures:
            logger.log_image("targets/figures", [str(p) for p in figures.values()], caption=list(figures))
        close_logger(logger)
    write_stamp(out, "targets", fp, result)
    return result
