"""stage=extract: residual activations and concept distributions of every task prompt (docs/method.md §2).

One forward pass per batch gives `h` (block `model.layer`, last token) and
`q` (full-vocabulary softmax at the last token, summed into concept bins plus
"other"). Several processes split the prompts (data parallel, each writing a
shard); finished chunks and shards survive a crash; the store appears atomically.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric import Fabric
from omegaconf import DictConfig
from torch.multiprocessing import ProcessRaisedException
from tqdm.auto import tqdm

from geosteer.data.store import (
    ActivationStore,
    ChunkDir,
    made_by,
    read_shards,
    virtual_rows,
    write_shard,
    write_store,
    write_task_group,
)
from geosteer.data.tasks import Task, concept_schema
from geosteer.models.lm import check_layer, lm_shape, read_last_token, replace_last_token, weight_sketch
from geosteer.pipeline.common import (
    StageError,
    close_logger,
    git_sha,
    load_lm,
    load_tasks,
    log,
    make_logger,
    to_plain,
    worker_error,
)
from geosteer.pipeline.products import (
    STAMP,
    RunLayout,
    check_inside,
    check_lm_unchanged,
    check_product,
    current_result,
    lm_files,
    lm_fingerprint,
    stage_fingerprint,
    warn_lm_config,
    warn_unapplied,
    write_stamp,
)

POSITION_RULE = "last non-pad token (left padding)"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise StageError("extract.device=cuda, but no CUDA GPU is visible to torch; use extract.device=auto or cpu.")
    return torch.device(name)


def extract_rows(model, tokenizer, texts: list[str], layer: int, variant_ids, batch_size: int, h_dtype: str):
    """`h`, `q` and `top1` of `texts`, batch by batch, as numpy arrays."""
    device = next(model.parameters()).device
    parts = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], padding=True, return_tensors="pt").to(device)
        out = read_last_token(model, enc.input_ids, enc.attention_mask, layer, variant_ids)
        parts.append((out.h.to(getattr(torch, h_dtype)).cpu(), out.q.cpu(), out.top1.cpu()))
    return {name: torch.cat(col).numpy() for name, col in zip(("h", "q", "top1"), zip(*parts))}


def row_classes(q: np.ndarray, answers: np.ndarray, rule: str, min_rows: int) -> tuple[np.ndarray, dict[int, int]]:
    """Each row's class: its answer's index (`rule="answer"`) or the LM's own arg-max concept (`"argmax"`).

    Under "argmax", a class of fewer than `min_rows` rows is left out: its rows get −1 (a task's
    answer classes are all kept). Returns the classes (N,) and {left-out class: its row count}.
    q (N, K+1), answers (N,)
    """
    if rule not in ("answer", "argmax"):
        raise StageError(f"extract.classes={rule!r} is unknown; use answer (the task's answers) or argmax (the LM's own).")
    if rule == "answer":
        return answers.astype(np.int32), {}
    labels = q[:, :-1].argmax(1).astype(np.int32)
    counts = np.bincount(labels, minlength=q.shape[1] - 1)
    small = {int(k): int(c) for k, c in enumerate(counts) if 0 < c < min_rows}
    labels[np.isin(labels, list(small))] = -1
    return labels, small


@torch.inference_mode()
def centroid_swap_rate(model, tokenizer, task: Task, rows, labels: np.ndarray, layer: int, variant_ids,
                       n_carriers: int = 16, seed: int = 0) -> float:  # fmt: skip
    """How often replacing `h` by a class centroid makes that class the arg-max of `q` (docs/method.md §0).

    Over `n_carriers` seeded prompts and every class of `labels` (−1: no class); near 1 means block
    `layer` carries the answer in a form that steering can move.
    """
    prompts = task.prompts()
    classes = np.unique(labels[labels >= 0])
    device = next(model.parameters()).device
    h = torch.from_numpy(rows["h"]).float()
    centroids = torch.stack([h[labels == k].mean(0) for k in classes]).to(device)  # (C, d)
    carriers = np.random.default_rng(seed).choice(len(prompts), min(n_carriers, len(prompts)), replace=False)
    hits = 0
    for c in carriers:
        enc = tokenizer([prompts[c].text] * len(classes), return_tensors="pt").to(device)
        with replace_last_token(model, layer, centroids):
            q = read_last_token(model, enc.input_ids, enc.attention_mask, layer, variant_ids).q
        hits += int((q[:, :-1].argmax(1).cpu().numpy() == classes).sum())
    return hits / (len(carriers) * len(classes))


def chunk_plan(sizes: dict[str, int], chunk_size: int, rank: int, world: int) -> dict[str, list[int]]:
    """The chunks each task gives `rank` of `world`: contiguous, in task order, about N/world prompts per rank.

    Chunks run over all tasks in order; a rank takes those that start in its share
    of the N prompts. Within a task, rank r's chunks come before rank r+1's, so the
    shards stack into each task's rows in rank order.
    """
    plan, start, total = {}, 0, sum(sizes.values())
    lo, hi = rank * total // world, (rank + 1) * total // world
    for task, n in sizes.items():
        plan[task] = [c for c in range(-(-n // chunk_size)) if lo <= start + c * chunk_size < hi]
        start += n
    return plan


def chunk_texts(task: Task, size: int, block: list[int]) -> dict[int, list[str]]:
    """The prompt texts of each chunk of `block`: chunk c holds prompts [c·size, (c+1)·size) of `task`."""
    texts = [p.text for p in task.prompts()]
    return {c: texts[c * size : (c + 1) * size] for c in block}


def extract_task(model, tokenizer, task: Task, schema, chunks: ChunkDir, cfg: DictConfig, block: list[int],
                 desc: str, on_chunk=None) -> None:  # fmt: skip
    """Write every missing chunk of `block` (this rank's chunk indices of one task); finished ones are kept (resume).

    Chunks are the unit of work whatever the number of ranks, so each prompt is
    batched with the same neighbours and a sharded run computes the same rows as one process.
    """
    texts = chunk_texts(task, cfg.extract.chunk_size, block)
    todo = [c for c in block if not chunks.done(task.name, c)]
    total = sum(len(t) for t in texts.values())
    with tqdm(total=total, initial=total - sum(len(texts[c]) for c in todo), unit="prompt", desc=desc) as bar:
        for c in todo:
            rows = extract_rows(
                model, tokenizer, texts[c], cfg.model.layer, schema.variant_ids, cfg.extract.batch_size,
                cfg.extract.h_dtype,
            )  # fmt: skip
            chunks.write(task.name, c, rows, texts[c])
            bar.update(len(texts[c]))
            if on_chunk is not None:
                on_chunk(task.name, c)


def check_vocabulary(tokenizer, task: Task, lm: str) -> None:
    """Refuse a task whose prompts or answers have words the embedded LM has no token for: it was trained for other
    tasks."""
    texts = [f"{p.text} {p.answer}" for p in task.prompts()]
    for text, ids in zip(texts, tokenizer(texts, add_special_tokens=False).input_ids):
        if tokenizer.unk_token_id in ids:
            words = [w for w in text.split() if tokenizer.unk_token_id in tokenizer.encode(w, add_special_tokens=False)]
            raise StageError(
                f"task '{task.name}': the embedded LM at {lm} has no token for {words[:3]} (in {text!r}): it was "
                f"trained for other tasks. Train it for these ones with `pipeline stage=lm overwrite=true` and the "
                f"same tasks=..., or extract with the tasks it was trained for."
            )


def extract_settings(cfg: DictConfig) -> dict[str, Any]:
    """The `extract.*` settings the store depends on (all but where it runs; min_class_rows only under argmax)."""
    settings = {k: v for k, v in to_plain(cfg.extract).items() if k != "device"}
    if settings.get("classes") == "answer":  # every answer class is kept: held at the default, as stores record it
        settings["min_class_rows"] = 10
    return settings


def extract_fingerprint(cfg: DictConfig, tasks: list[Task]) -> str:
    return stage_fingerprint(
        {
            "model": cfg.model,
            "lm": lm_fingerprint(cfg.model),
            "tasks": [t.to_dict() for t in tasks],
            "extract": extract_settings(cfg),
        },
        run_dir=cfg.paths.run_dir,
    )


def warn_unextracted(cfg: DictConfig, what: str) -> None:
    """Warn when the config's `extract.*` differ from those the run's store was extracted with: later stages use the
    store as it is."""
    fix = "To extract with them: `pipeline stage=all overwrite=true` (it makes what follows again too)."
    warn_unapplied(RunLayout.of(cfg).extract, {"extract": extract_settings(cfg)}, what, fix, cfg.paths.run_dir)


def launcher(trainer: DictConfig) -> Fabric:
    """The processes that extract: the trainer config's accelerator, devices, nodes and strategy, through Fabric.

    `trainer=cpu`/`gpu` is one process; `trainer=ddp` one per GPU and `trainer=ddp_sim` two on the CPU
    (spawned); under torchrun or SLURM (`trainer.strategy=ddp`) every launched process is a rank.
    """
    return Fabric(accelerator=trainer.accelerator, devices=trainer.devices, num_nodes=trainer.get("num_nodes", 1),
                  strategy=trainer.get("strategy", "auto"))  # fmt: skip


def run(cfg: DictConfig, on_chunk=None) -> dict:
    """Extract every task into `<run_dir>/extract/activations.h5`, on one process or several (data parallel).

    Each rank extracts its run of chunks (`chunk_plan`: about N/W prompts, in task
    order) and gathers them into its shard, `extract/shards-<fingerprint>/rank-<r>-of-<W>.h5`;
    rank 0 then writes the store, whose row arrays are virtual datasets over the shards.

    Args:
        on_chunk: called as `on_chunk(task, chunk_index)` after each chunk is safely on disk.
    """
    tasks = load_tasks(cfg)
    run = RunLayout.of(cfg)
    out = run.extract
    check_inside(run.root, out)
    fp = extract_fingerprint(cfg, tasks)
    warn_lm_config(cfg, "the extraction")
    if (done := current_result(out, fp, f"the activation store {run.store}", cfg.overwrite)) is not None:
        with ActivationStore(run.store) as store:
            check_lm_unchanged(cfg.model, run.store, store.attrs)
        return done
    if not cfg.overwrite and not (out / STAMP).is_file() and run.store.is_file() and made_by(run.store) != fp:
        raise StageError(
            f"{run.store} is not this config's store ({made_by(run.store) or 'it records no config'}, now {fp}) and "
            f"{out} has no {STAMP}, the record its stage writes (copied or kept there by hand): extracting would "
            f"replace it. Move it elsewhere, or pass overwrite=true to replace it."
        )
    if not (out / f".partial-{fp}").is_dir():  # shards of a finished store, whose chunks are gone: extract again
        shutil.rmtree(out / f"shards-{fp}", ignore_errors=True)
    fabric = launcher(cfg.trainer)
    if fabric.world_size > 1 and cfg.model.device_map is not None:
        raise StageError(
            f"model.device_map={cfg.model.device_map} spreads one model over the GPUs of one process, but "
            f"trainer asks for {fabric.world_size} processes. Use one: trainer=gpu with device_map, or "
            f"trainer=ddp with model.device_map=null."
        )
    try:
        return fabric.launch(extract_on_rank, cfg, fp, on_chunk)
    except ProcessRaisedException as e:  # a spawned rank's error arrives as its traceback text
        raise StageError(f"extraction failed on a worker process: {worker_error(e)}") from e


def extract_on_rank(fabric: Fabric, cfg: DictConfig, fp: str, on_chunk=None) -> dict | None:
    """One rank's share of `run`: its chunks and its shard; rank 0 also writes the store. Rank 0 returns the result."""
    tasks = load_tasks(cfg)
    rank, world = fabric.global_rank, fabric.world_size
    run = RunLayout.of(cfg)
    out = run.extract
    m = cfg.model
    if m.embedded:
        check_product(Path(m.pretrained), "Train it again with `pipeline stage=lm overwrite=true`.")
    model, tokenizer = load_lm(m)
    check_layer(model, m.layer)
    if m.device_map is None:
        model.to(resolve_device(cfg.extract.device) if world == 1 else fabric.device)
    if m.embedded:  # its vocabulary is its tasks' words: another task's are named with the fix first
        for t in tasks:
            check_vocabulary(tokenizer, t, m.pretrained)
    schemas = {t.name: concept_schema(t, tokenizer, m.pretrained) for t in tasks}

    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        for stale in out.glob(".partial-*"):
            if stale.name != f".partial-{fp}":
                log.warning("removing unfinished chunks of another config: %s", stale)
                shutil.rmtree(stale)
    chunks = ChunkDir(out / f".partial-{fp}")
    shards = out / f"shards-{fp}"
    shard = shards / f"rank-{rank}-of-{world}.h5"
    start = time.perf_counter()
    sizes, size = {t.name: len(t.prompts()) for t in tasks}, cfg.extract.chunk_size
    # {rank's shard: {task: the texts of its rows}}
    held = {
        shards / f"rank-{r}-of-{world}.h5": {
            t.name: [x for xs in chunk_texts(t, size, chunk_plan(sizes, size, r, world)[t.name]).values() for x in xs]
            for t in tasks
        }
        for r in range(world)
    }
    if not shard.is_file():  # a finished shard survives a crash of the others
        plan = chunk_plan(sizes, size, rank, world)
        for t in tasks:
            desc = f"extract {t.name}" + (f" (rank {rank} of {world})" if world > 1 else "")
            extract_task(model, tokenizer, t, schemas[t.name], chunks, cfg, plan[t.name], desc, on_chunk)
        rows = {t.name: chunks.read_task(t.name, chunk_texts(t, size, plan[t.name])) for t in tasks if plan[t.name]}
        write_shard(shard, rows, held[shard], cfg.extract.compression)
    fabric.barrier()
    seconds = time.perf_counter() - start
    if rank != 0:
        return None

    summary = {}
    ranks = list(held)

    def write_groups(f) -> None:
        for task in tasks:
            rows = read_shards({s: texts[task.name] for s, texts in held.items()}, task.name)
            prompts = task.prompts()
            layouts = virtual_rows(run.store, ranks, task.name)
            answers = np.array([p.label for p in prompts])
            labels, left_out = row_classes(rows["q"], answers, cfg.extract.classes, cfg.extract.min_class_rows)
            if len(np.unique(labels[labels >= 0])) < 2:
                raise StageError(
                    f"task '{task.name}': the LM's arg-max gives fewer than two classes of at least "
                    f"extract.min_class_rows={cfg.extract.min_class_rows} rows (left out: "
                    f"{ {task.concepts[k]: n for k, n in left_out.items()} }), so there is nothing to steer between. "
                    f"Lower extract.min_class_rows, use extract.classes=answer, pick a later model.layer, or drop "
                    f"the task (benchmarks/layers.py measures each task's accuracy on a model)."
                )
            write_task_group(f, schemas[task.name], task.to_dict(), prompts, layouts, cfg.extract.compression, labels)
            summary[task.name] = {
                "n": len(prompts),
                "d": int(rows["h"].shape[1]),
                "K": schemas[task.name].K,
                "answer_accuracy": float((rows["q"][:, :-1].argmax(1) == answers).mean()),
                "mean_other_mass": float(rows["q"][:, -1].mean()),
                "classes": cfg.extract.classes,
                "n_classes": int(len(np.unique(labels[labels >= 0]))),
                "left_out_classes": {task.concepts[k]: n for k, n in left_out.items()},
                "centroid_swap_rate": centroid_swap_rate(
                    model, tokenizer, task, rows, labels, m.layer, schemas[task.name].variant_ids, seed=cfg.seed
                ),
            }
            if left_out:
                log.warning("%s: classes %s have fewer than extract.min_class_rows=%d rows and are left out of "
                            "centroids and steering pairs", task.name, summary[task.name]["left_out_classes"],
                            cfg.extract.min_class_rows)  # fmt: skip

    attrs = {
        "model_name": m.name,
        "model_pretrained": m.pretrained,
        "model_revision": m.revision or "",
        "lm_fingerprint": lm_fingerprint(m) or "",  # the embedded LM's, which eval checks it still has
        "lm_shape": json.dumps(lm_shape(model)),  # which steering checks a model against
        "lm_sketch": json.dumps(weight_sketch(model)),  # and a content check of its weights (`lm_change`)
        "lm_files": json.dumps(lm_files(m)),  # an LM outside the run: its files, checked before the store is reused
        "layer": m.layer,
        "position_rule": POSITION_RULE,
        "dtype": m.dtype,
        "h_dtype": cfg.extract.h_dtype,
        "fingerprint": str(fp),
        "ranks": world,
        "git_sha": git_sha() or "",
        "config": to_plain(cfg),
    }
    write_store(run.store, attrs, write_groups)
    for old in out.glob("shards-*"):  # shards of a store this one replaced
        if old != shards:
            shutil.rmtree(old, ignore_errors=True)
    for stray in set(shards.iterdir()) - set(ranks):  # a crashed run's shards of another rank count
        stray.unlink()
    n = sum(s["n"] for s in summary.values())
    result = {"path": str(run.store), "ranks": world, "tasks": summary, "seconds": round(seconds, 2),
              "prompts_per_s": n / seconds}  # fmt: skip
    for name, s in summary.items():
        log.info(
            "extracted %s: %d prompts, d=%d, K=%d, argmax-q accuracy %.1f%%, %d classes (%s), centroid swap rate %.1f%%",
            *(
                name,
                s["n"],
                s["d"],
                s["K"],
                100 * s["answer_accuracy"],
                s["n_classes"],
                s["classes"],
                100 * s["centroid_swap_rate"],
            ),
        )
    if logger := make_logger(cfg, "extract"):
        logger.log_metrics({f"extract/{t}/{k}": v for t, row in summary.items() for k, v in row.items()
                            if isinstance(v, (int, float))})  # fmt: skip
        logger.log_metrics({"extract/prompts_per_s": result["prompts_per_s"]})
        close_logger(logger)
    write_stamp(out, "extract", fp, result)
    shutil.rmtree(chunks.root, ignore_errors=True)
    return result
