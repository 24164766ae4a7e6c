"""`pipeline stage=<name> [overrides]`: a thin Hydra entry point around `run(cfg)`."""

from __future__ import annotations

import contextlib
import difflib
import errno
import itertools
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Glob
from hydra.errors import HydraException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors import SafetensorError

from geosteer.data.store import StoreError
from geosteer.data.targets import MIN_SPLIT_ROWS, TargetError
from geosteer.data.tasks import TaskError
from geosteer.models.hub import CheckpointError, GeometryMismatch
from geosteer.models.lm import ModelLoadError
from geosteer.models.steer import SteeringError
from geosteer.pipeline import eval as evaluate
from geosteer.pipeline import extract, lm, steer, targets, train
from geosteer.pipeline.common import CONFIG_DIR, StageError, launched_rank, load_tasks, log
from geosteer.pipeline.methods import build_methods
from geosteer.pipeline.products import RunLayout, check_run_dir, run_lock
from geosteer.pipeline.settings import check_settings, resolve
from geosteer.pipeline.summary import quiet_third_parties, summary

# Errors whose message already names the bad value and the fix: shown without a traceback.
USER_ERRORS = (StageError, TaskError, StoreError, TargetError, ModelLoadError, CheckpointError, GeometryMismatch,
               SteeringError)  # fmt: skip
# A full disk, a quota, a size limit, a read-only or forbidden folder: the machine's fault, not the code's.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}

# Stages whose work is split over DDP ranks; the others run in one process.
DATA_PARALLEL = ("extract", "train")
STAGES: dict[str, Callable[[DictConfig], dict]] = {
    "lm": lm.run,
    "extract": extract.run,
    "targets": targets.run,
    "train": train.run,
    "eval": evaluate.run,
    "steer": steer.run,  # not part of stage=all: it uses what the others made
}
PIPELINE = ("lm", "extract", "targets", "train", "eval")  # what stage=all runs, in order


def run(cfg: DictConfig, seconds: dict[str, float] | None = None) -> dict:
    """Run one stage, or every stage in order for stage=all, holding the run's lock; returns each stage's result.

    `seconds`, when given, receives each stage's wall time in this call (a stage found current: the time to check it).
    """
    check_settings(cfg)
    check_run_dir(cfg)
    if launched_rank()[0] != 0:  # rank 0 of a launched DDP run holds the lock for all its ranks
        return _run(cfg, {} if seconds is None else seconds)
    with run_lock(cfg.paths.run_dir):
        return _run(cfg, {} if seconds is None else seconds)


def _timed(name: str, cfg: DictConfig, seconds: dict[str, float]) -> dict:
    start = time.perf_counter()
    result = STAGES[name](cfg)
    seconds[name] = time.perf_counter() - start
    return result


def _run(cfg: DictConfig, seconds: dict[str, float]) -> dict:
    rank, world = launched_rank()
    if world > 1 and cfg.stage not in DATA_PARALLEL:
        by = "torchrun (WORLD_SIZE)" if "WORLD_SIZE" in os.environ else "SLURM (SLURM_NTASKS)"
        raise StageError(
            f"stage={cfg.stage} runs in one process, but this is rank {rank} of {world} processes started by {by}. "
            f"Launch only stage=extract or stage=train that way (trainer=ddp_launched), and run stage={cfg.stage} as "
            f"one process: outside torchrun, or as one SLURM task (`srun --ntasks=1 pipeline ...`; in a shell of a "
            f"SLURM allocation, `SLURM_NTASKS=1 pipeline ...`)."
        )
    if cfg.stage in ("all", "eval"):
        build_methods(cfg.get("method"))  # a bad method choice is refused before the stages before eval run
    if cfg.stage == "all":
        geometries = train.selected_geometries(cfg)
        train.check_trained_against(cfg, geometries)  # and a bad geometry choice, before them
        check_sizes(cfg, geometries)
        names = [s for s in PIPELINE if s != "lm" or cfg.model.embedded]
        return {name: _timed(name, cfg, seconds) for name in names}
    if cfg.stage not in STAGES:
        raise StageError(f"stage '{cfg.stage}' is unknown; use one of {[*STAGES, 'all']}.")
    return {cfg.stage: _timed(cfg.stage, cfg, seconds)}


def check_sizes(cfg: DictConfig, geometries: dict) -> None:
    """Refuse, before any stage runs, a task too small for the targets' split, or for a geometry setting that needs
    more training rows than the task can give (a task's rows are its prompts; at least MIN_SPLIT_ROWS of them
    validate)."""
    rows = {t.name: len(t.prompts()) for t in load_tasks(cfg)}
    f = cfg.targets.val_fraction  # the most rows a split can give validation: all rows in one class
    if few := {name: n for name, n in rows.items() if n < 2 * MIN_SPLIT_ROWS or min(round(f * n), n - 1) < MIN_SPLIT_ROWS}:
        raise StageError(f"task(s) {few} have too few prompts (rows): stage=targets splits each task's rows into "
                         f"training and validation rows, at least {MIN_SPLIT_ROWS} each, and with "
                         f"targets.val_fraction={f} no split of so few does. Add prompts to the task's file (more "
                         f"templates or numbers), or raise targets.val_fraction.")  # fmt: skip
    most = {name: n - MIN_SPLIT_ROWS for name, n in rows.items()}  # training rows, at most
    for name, g in geometries.items():
        for setting, fits, what in (("pca_dim", lambda v, n: v <= n, "at least as many"), ("knn", lambda v, n: v < n, "more")):
            if (v := g.get(setting)) is not None and (small := {t: n for t, n in most.items() if not fits(v, n)}):
                raise StageError(f"geometry.{name}.{setting}={v} needs {what} training rows, but task(s) {small} give "
                                 f"at most that many (their prompts, less {MIN_SPLIT_ROWS} that validate); lower "
                                 f"geometry.{name}.{setting} (e.g. to {min(small.values()) // 2}) or add prompts to the "
                                 f"task.")  # fmt: skip


def _finish_wandb(exit_code: int) -> None:
    """Close a W&B run left open by a failed stage, so its files are complete."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=exit_code)


SEVERAL_KINDS = {"trainer.devices"}  # a count, a list of indices or "auto": its range check alone judges it


def override_type_errors(cfg: Any, defaults: Any, key: str = "") -> list[str]:
    """Where `cfg` holds a value of another kind than the default config at the same key (unresolved trees).

    Numbers, booleans, lists and sections are checked; strings and null defaults take anything.
    """
    if isinstance(defaults, dict):
        if not isinstance(cfg, dict):
            return [f"{key}={cfg!r} replaces a section; set its keys instead, e.g. {key}.{next(iter(defaults), 'x')}=..."]
        return [e for k in defaults if k in cfg for e in override_type_errors(cfg[k], defaults[k], f"{key}.{k}".lstrip("."))]
    interpolated = any(isinstance(v, str) and "${" in v for v in (cfg, defaults))
    if key in SEVERAL_KINDS or defaults is None or isinstance(defaults, str) or interpolated or cfg is None:
        return []
    kind = {bool: "a boolean", int: "an integer", float: "a number", list: "a list"}[type(defaults)]
    fits = {bool: lambda v: isinstance(v, bool), int: lambda v: isinstance(v, int) and not isinstance(v, bool),
            float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            list: lambda v: isinstance(v, list)}[type(defaults)]  # fmt: skip
    if fits(cfg):
        return []
    example = "[" + ",".join(map(str, defaults)) + "]" if isinstance(defaults, list) else str(defaults).lower()
    return [f"{key}={cfg!r} is not {kind} (the default is {example}); e.g. {key}={example}"]


def check_override_types(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """Refuse command-line values of the wrong kind (`extract.batch_size=abc`, `tasks=weekdays`) before any work.

    The reference is the default config with the same config-group choices, so
    `model=gpt2 model.layer=x` is checked against gpt2's own file; it is returned.
    """
    picks = [o for o in overrides if (CONFIG_DIR / o.split("=")[0].lstrip("+~").split("@")[0]).is_dir()]
    defaults = compose(config_name="config", overrides=picks)
    plain = lambda c: OmegaConf.to_container(c, resolve=False)  # noqa: E731
    if errors := override_type_errors(plain(cfg), plain(defaults)):
        raise StageError("wrong kind of value: " + "; ".join(errors) + ".")
    return defaults


def reparsed_strings(cfg: DictConfig, defaults: DictConfig, overrides: list[str]) -> list[str]:
    """Text settings (a run name, a path) that Hydra read as another value than their text: `run_name=1e3` is the
    number 1000.0 (a folder named 1000.0), `true` is True, `null` is None."""
    errors, seen = [], set()
    for o in reversed(overrides):  # the last override of a key is the one that counts
        key, _, raw = o.lstrip("+").partition("=")
        if o.startswith("~") or (CONFIG_DIR / key.split("@")[0]).is_dir() or key in seen or "${" in raw:
            continue
        seen.add(key)
        default, now = OmegaConf.select(defaults, key, default=None), OmegaConf.select(cfg, key, default=None)
        if isinstance(default, str) and not isinstance(now, (str, list, dict, DictConfig, ListConfig)) and str(now) != raw:
            errors.append(f"{key}={raw} is read as {now!r}, not as the text {raw!r}; quote it ({key}=\"'{raw}'\" in a "
                          f"shell) or use other text, e.g. {key}=x{raw}")  # fmt: skip
    return errors


def check_config(cfg: DictConfig, overrides: list[str]) -> None:
    """Every check of a composed config that needs no stage: kinds of value, interpolations, the run folder, ranges."""
    defaults = check_override_types(cfg, overrides)
    resolve(cfg)
    check_settings(cfg, defaults)  # first: the run folder's check needs paths that are strings
    if errors := reparsed_strings(cfg, defaults, overrides):  # after the settings' own checks, which name the fix
        raise StageError("wrong kind of value: " + "; ".join(errors) + ".")
    check_run_dir(cfg)


def storage_errno(e: BaseException) -> int | None:
    """The errno of a failed write (full disk, read-only folder...), also from h5py, which keeps it in the text."""
    code = getattr(e, "errno", None)
    if code is None and (m := re.search(r"errno = (\d+)", str(e))):
        code = int(m.group(1))
    return code if code in STORAGE_ERRNOS else None


def group_options(key: str) -> list[str] | None:
    """The options of the config group a command-line key picks from (`model`, `+geometry`), or None for a setting."""
    group = CONFIG_DIR / key.lstrip("+~").split("@")[0]
    return sorted(p.stem for p in group.glob("*.yaml")) if group.is_dir() and not key.startswith("hydra") else None


def swept(override) -> list[str]:
    """The values of a sweep override, as Hydra's sweeper gives them: `a,b`, `choice(a,b)`, `range(...)`, and
    `glob(...)` over its config group's options."""
    if isinstance(value := override.value(), Glob):
        return value.filter(group_options(override.get_key_element()) or [])
    return list(override.sweep_string_iterator())


def unknown_choices(argv: list[str]) -> list[str]:
    """Config-group picks on the command line (`model=x`, `geometry=[a,b]`, `-m task=choice(a,b)`) that name no file
    of the group."""
    errors = []
    for arg in argv:
        key, _, value = arg.partition("=")
        if not value or (options := group_options(key)) is None:
            continue
        try:
            override = OverridesParser.create().parse_overrides([arg])[0]
            picks = swept(override) if override.is_sweep_override() else [override.value()]
        except HydraException:  # not Hydra's syntax: Hydra names it
            continue
        if not picks:
            errors.append(f"{arg} picks none of {options} (configs/{key}/*.yaml); give a pattern that matches one")
        for pick in picks:  # a name, a list of names, or a sweep value as text ("[a,b]")
            names = pick if isinstance(pick, list) else [] if pick is None else str(pick).strip("[]").split(",")
            for name in (str(n).strip() for n in names):
                if name and name != "null" and name not in options:
                    errors.append(f"{key}={name} is unknown; {key} takes one of {options} (configs/{key}/*.yaml)")
    return errors


SWEEP_CHECK_MAX = 64  # a sweep of up to this many jobs is checked job by job, a larger one each value once


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The override lists of a `-m` sweep's jobs to check: all of them, or for a sweep of more than SWEEP_CHECK_MAX
    jobs each swept value once (the others at their first value)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    values = [swept(o) if o.is_sweep_override() else [None] for o in parsed]
    if math.prod(len(v) for v in values) <= SWEEP_CHECK_MAX:
        return [[arg if x is None else f"{o.get_key_element()}={x}" for arg, o, x in zip(overrides, parsed, job)]
                for job in itertools.product(*values)]  # fmt: skip
    first = [arg if v[0] is None else f"{o.get_key_element()}={v[0]}" for arg, o, v in zip(overrides, parsed, values)]
    jobs = [first]
    for i, (o, v) in enumerate(zip(parsed, values)):
        jobs += [first[:i] + [f"{o.get_key_element()}={x}"] + first[i + 1 :] for x in v[1:]]
    return jobs


# Hydra's flags that only print (help, the config, the version): they run nothing, so there is nothing to check.
PRINT_FLAGS = {"-h", "--help", "--hydra-help", "--version", "-c", "--cfg", "--resolve", "-p", "--package", "-i",
               "--info", "-sc", "--shell-completion"}  # fmt: skip
SWEEP_FLAGS = {"-m", "--multirun"}
RUN_FLAGS = {"-r", "--run"}
# The Hydra settings a command may change. The others would move Hydra's files or the working folder out of the run,
# where the lock and resume fail (hydra.run.dir, hydra.job.chdir, hydra.output_subdir, the log handlers' files), or
# silence the error messages (hydra/job_logging=disabled).
HYDRA_SETTINGS = ("hydra.verbose=", "hydra/launcher=", "hydra.launcher.", "hydra/sweeper=",
                  "hydra.sweeper.max_batch_size=", "hydra.sweep.dir=")  # fmt: skip


def flag_errors(argv: list[str]) -> list[str]:
    """Flags and Hydra settings that geosteer refuses, each with what to do instead."""
    errors = []
    for arg in argv:
        if arg.startswith("-") and arg.split("=")[0] not in PRINT_FLAGS | SWEEP_FLAGS | RUN_FLAGS:
            errors.append(f"{arg.split('=')[0]} is not a flag of `pipeline` (configs come from configs/; choose them "
                          f"with overrides such as model=smollm2 or tasks=[path/to/task.yaml]); `pipeline --help` "
                          f"lists the flags")  # fmt: skip
        elif arg.lstrip("+~").startswith("hydra") and not arg.lstrip("+~").startswith(HYDRA_SETTINGS):
            errors.append(f"{arg} is not a setting geosteer takes: Hydra's own files stay in <run>/hydra/, inside the "
                          f"run folder. Move a run with paths.outputs=... or run_name=...; the Hydra settings a "
                          f"command may change are hydra.verbose, hydra/launcher, hydra.launcher.*, hydra/sweeper, "
                          f"hydra.sweeper.max_batch_size and hydra.sweep.dir (a sweep's values go on the command "
                          f"line: -m seed=0,1)")  # fmt: skip
        elif arg.lstrip("+~").startswith("hydra.sweeper.max_batch_size="):
            size = arg.split("=", 1)[1]
            if not (size.isdigit() and int(size) >= 1) and size != "null":
                errors.append(f"{arg}: the number of sweep jobs launched together must be an integer ≥ 1 (or null: "
                              f"all at once)")  # fmt: skip
    return errors


def makeable(folder: Path, key: str, value: str) -> list[str]:
    """Why `folder` cannot be made (Hydra makes it next), naming the setting to change; nothing is left behind."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        for attempt in range(3):  # ranks started together each check and remove: one may remove a parent meanwhile
            try:
                folder.mkdir(parents=True, exist_ok=True)
                break
            except FileNotFoundError:
                if attempt == 2:
                    raise
        for made in missing:  # deepest first; a time-based run_name would otherwise leave an empty twin
            with contextlib.suppress(OSError):  # unless another process has put something in it
                made.rmdir()
    except OSError as e:
        return [f"cannot make the folder {folder} ({e.strerror}); point {key}=... at a folder you can write (it is "
                f"{value})"]  # fmt: skip
    return []


def job_run_dirs(jobs: list[list[str]]) -> list[Path]:
    """The run folder of each sweep job, resolved."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return [Path(compose(config_name="config", overrides=job).paths.run_dir).resolve() for job in jobs]


def shared_run_folders(jobs: list[list[str]], run_dirs: list[Path]) -> list[str]:
    """Sweep jobs that would write one run folder with different settings (only `stage` and `steer.*` may differ)."""
    seen: dict[Path, list[str]] = {}
    for job, run_dir in zip(jobs, run_dirs):
        settings = [arg for arg in job if not arg.startswith(("stage=", "steer."))]  # neither changes a product
        if seen.setdefault(run_dir, settings) != settings:
            return [f"jobs of this sweep with different settings ({' '.join(seen[run_dir])} and {' '.join(settings)}) "
                    f"would write one run folder, {run_dir}; give each its own, e.g. 'run_name=${{task.name}}' or "
                    f"'run_name=seed${{seed}}'"]  # fmt: skip
    return []


def sweep_dir_in_a_run(argv: list[str], run_dirs: list[Path]) -> list[str]:
    """A `hydra.sweep.dir` inside a job's run folder, whose products the jobs replace whole (its logs with them)."""
    for arg in argv:
        if arg.startswith("hydra.sweep.dir="):
            where = Path(arg.split("=", 1)[1].split("${")[0]).resolve()
            for run_dir in run_dirs:
                if where.is_relative_to(run_dir):
                    return [f"{arg} lies in the run folder {run_dir}, whose products the jobs replace whole (and Hydra's "
                            f"logs with them); put the sweep's logs outside it, or leave hydra.sweep.dir at its default "
                            f"(under paths.outputs/multirun)"]  # fmt: skip
    return []


OPEN_SECTIONS = ("trainer", "logger", "hydra")  # keyword arguments of Lightning's Trainer and the logger: open
# Settings read when present and absent from some YAMLs: the only keys a `+` may add outside the open sections.
OPTIONAL_SETTINGS = ("model.gguf", "model.revision", "geometry.*.monitor")
REGISTRIES = ("geometry", "method")  # sections of named entries, each from a YAML of its config group
ABSENT = object()


def _optional(key: str, base: DictConfig) -> bool:
    """Whether `key` is an optional setting of a section the config holds (a `*` stands for an entry it has)."""
    parts = key.split(".")
    for pattern in (o.split(".") for o in OPTIONAL_SETTINGS):
        if len(pattern) <= len(parts) and all(a in ("*", b) for a, b in zip(pattern, parts)):
            stars = [i for i, a in enumerate(pattern) if a == "*"]
            if all(OmegaConf.select(base, ".".join(parts[: i + 1]), default=ABSENT) is not ABSENT for i in stars):
                return True
    return False


def unread_additions(overrides: list[str]) -> list[str]:
    """`+a.b=v` that adds a key nothing reads (`+steer.alpah=0`: the setting meant silently keeps its value; Hydra
    suggests `+` for a misspelt key). Open: the Trainer's and the logger's keywords, config groups and
    OPTIONAL_SETTINGS; `++a.b=v` of a key the config holds is an override. Call within an initialised config dir."""
    added = [arg.split("=", 1)[0] for arg in overrides if arg.startswith("+")]
    added = [k for k in added if k.lstrip("+").split(".")[0] not in OPEN_SECTIONS
             and not (CONFIG_DIR / k.lstrip("+").replace(".", "/")).is_dir()]  # fmt: skip
    if not added:
        return []
    base = compose(config_name="config", overrides=[arg for arg in overrides if not arg.startswith("+")])
    errors = []
    for forced, key in ((k.startswith("++"), k.lstrip("+")) for k in added):
        if _optional(key, base) or (forced and OmegaConf.select(base, key, default=ABSENT) is not ABSENT):
            continue
        parts = key.split(".")
        if parts[0] in REGISTRIES and len(parts) >= 2 and parts[1] not in (base.get(parts[0]) or {}):
            errors.append(f"+{key}: {parts[0]}.{parts[1]} is not one of this command's {parts[0]} entries "
                          f"({', '.join(map(str, base.get(parts[0]) or {})) or 'none'}); a new one is a YAML file in "
                          f"configs/{parts[0]}/, chosen with {parts[0]}=[...,{parts[1]}] (docs/extending.md)")  # fmt: skip
            continue
        parent, _, leaf = key.rpartition(".")
        siblings = OmegaConf.select(base, parent) if parent else base
        names = [str(k) for k in siblings] if isinstance(siblings, DictConfig) else []
        where = f"{parent}." if parent else ""
        if close := difflib.get_close_matches(leaf, names, n=1, cutoff=0.75):
            errors.append(f"+{key} adds a setting that nothing reads, beside {where}{close[0]}: did you mean "
                          f"{where}{close[0]}=... (without the +)?")  # fmt: skip
        else:
            holds = (f"{parent or 'the config'} holds {', '.join(names[:12])}{', ...' if len(names) > 12 else ''}; set "
                     f"one of those without the +" if names else f"there is no section {parent}")  # fmt: skip
            errors.append(f"+{key} adds a setting that nothing reads ({holds}); `pipeline --cfg job` prints every "
                          f"setting")  # fmt: skip
    return errors


def precheck(argv: list[str], sweeping: bool = False) -> list[str]:
    """Problems of the config a command asks for, found before Hydra writes its logs (under the run folder).

    Flags that only print (`--help`, `--cfg job`) are left to Hydra; a `-m` sweep is checked job by job.
    """
    if any(arg.split("=")[0] in PRINT_FLAGS for arg in argv):
        return []
    if errors := flag_errors(argv):
        return errors
    launcher = next((arg.split("=", 1)[1] for arg in argv if arg.lstrip("+").startswith("hydra/launcher=")), "")
    if "slurm" in launcher and any(arg in SWEEP_FLAGS for arg in argv) and not shutil.which("srun"):
        return [f"hydra/launcher={launcher} submits the jobs to SLURM, but this machine has no srun on its PATH; run "
                f"the command on a SLURM login node, or leave hydra/launcher=... out to run the jobs here"]  # fmt: skip
    if deleted := [arg for arg in argv if arg.startswith("~")]:
        return [f"{arg} deletes a setting geosteer reads; set it instead ({arg[1:].split('=')[0]}=<value>)" for arg in deleted]
    if nulls := [k for arg in argv if (k := arg.split("=")[0]) and arg.endswith("=null") and (CONFIG_DIR / k).is_dir()]:
        return [f"{k}=null: a config group takes one of its options (configs/{k}/*.yaml), not null" for k in nulls]
    overrides = [arg for arg in argv if not arg.lstrip("+~").startswith("hydra") and not arg.startswith("-")]
    if any(arg in SWEEP_FLAGS for arg in argv):
        try:
            jobs = sweep_jobs(overrides)
        except HydraException as e:
            return [" ".join(str(e).split())]
        logs = [makeable(Path(a.split("=", 1)[1].split("${")[0]), "hydra.sweep.dir", a.split("=", 1)[1])
                for a in argv if a.startswith("hydra.sweep.dir=")]  # fmt: skip
        if errors := (next((errors for errors in logs if errors), [])
                      or next((errors for job in jobs if (errors := precheck(job, sweeping=True))), [])):  # fmt: skip
            return errors
        run_dirs = job_run_dirs(jobs)
        return shared_run_folders(jobs, run_dirs) or sweep_dir_in_a_run(argv, run_dirs)
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
            if errors := unread_additions(overrides):
                return errors
            check_config(cfg, overrides)
        # Hydra makes its log folder there next (a sweep's under paths.outputs/multirun; each job makes its run
        # folder): a file in the way or a forbidden place would fail with a traceback.
        return makeable(Path(cfg.paths.outputs if sweeping else cfg.paths.run_dir), "paths.outputs", cfg.paths.outputs)
    except StageError as e:
        return [str(e).removesuffix(".")]
    except OverrideParseException as e:  # Hydra's grammar: name the override and how to quote its value
        key, _, value = str(e.override).partition("=")
        why = " ".join(e.message.split("See https")[0].split())
        return [f"{e.override} cannot be read as an override ({why}): a value with spaces, brackets, parentheses, "
                f"quotes, < > or other special characters must be quoted whole, e.g. {key}=\"'{value}'\" in a shell "
                f"(docs: hydra.cc, override grammar)"]  # fmt: skip
    except (HydraException, OmegaConfBaseException) as e:
        return [" ".join(str(e).split())]
    return []


def explain(e: Exception) -> str:
    """One paragraph for any error that stops a command: what failed, on which value or file, and the fix."""
    if isinstance(e, USER_ERRORS):
        return f"{type(e).__name__}: {e}"
    text = " ".join(str(e).split())[:600]
    where = getattr(e, "filename", None) or (m[1] if (m := re.search(r"name = '([^']+)'", text)) else None)
    if isinstance(e, (FileExistsError, NotADirectoryError)) and where:  # a file where a folder goes (or on its way)
        return (f"{where}: a file lies where a folder is expected, that path or one above it ({type(e).__name__}: "
                f"{text}). Move that file away (or delete it) and re-run the command.")  # fmt: skip
    if isinstance(e, (OSError, SafetensorError, yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError)) and where:
        return (f"could not read {where} ({type(e).__name__}: {text}). If it is a product of this run, it is damaged: "
                f"delete it and re-run the stage that makes it (`pipeline stage=...` with the same overrides); "
                f"otherwise check that path.")  # fmt: skip
    return (f"stopped on an unexpected {type(e).__name__}: {text}. geosteer does not check this input yet; products "
            f"already finished are kept. Re-run with hydra.verbose=geosteer to see the traceback, and report it with "
            f"the command.")  # fmt: skip


def main() -> None:
    """The `pipeline` command: the whole config is checked before Hydra writes anything."""
    argv = sys.argv[1:]
    errors = unknown_choices(argv) or precheck(argv)
    if errors:
        print(f"error: {'; '.join(errors)}.", file=sys.stderr)
        sys.exit(1)
    quiet_third_parties()
    hydra_main()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    """One boundary: every error ends as one paragraph and exit status 1; the traceback only with hydra.verbose."""
    interrupted = []  # Ctrl-C seen: Lightning turns the KeyboardInterrupt inside a fit into exit(1)

    def on_interrupt(signum, frame):
        interrupted.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_interrupt) if threading.current_thread() is threading.main_thread() else None
    try:
        check_config(cfg, list(HydraConfig.get().overrides.task))
        result = run(cfg, seconds := {})
        if launched_rank()[0] == 0:  # the other launched ranks have nothing to report
            log.info("%s", summary(result, RunLayout.of(cfg), seconds))
    except (KeyboardInterrupt, SystemExit) as e:
        if isinstance(e, SystemExit) and not (interrupted and e.code not in (0, None)):
            raise
        _finish_wandb(exit_code=130)
        if log.isEnabledFor(logging.DEBUG):
            raise
        log.error("interrupted. Products already finished are kept, and the unfinished one is left unreadable rather "
                  "than half-written; re-run the same command to resume.")  # fmt: skip
        sys.exit(130)
    except Exception as e:
        _finish_wandb(exit_code=1)
        if log.isEnabledFor(logging.DEBUG):
            raise
        if (code := storage_errno(e)) is not None:
            log.error(
                "could not write the outputs (%s: %s). Products already finished are kept, and the unfinished one "
                "is left unreadable rather than half-written. Free space or make %s writable (or point "
                "paths.outputs=... elsewhere), then re-run the same command: it resumes.",
                errno.errorcode[code], e, cfg.paths.run_dir,
            )  # fmt: skip
        else:
            log.error("%s", explain(e))
        if HydraConfig.initialized() and (hc := HydraConfig.get()).mode == RunMode.MULTIRUN:
            log.error("The -m sweep stops at this job (#%s): any jobs after it did not run. Once it is mended, the "
                      "same command runs them; the jobs that finished are current and skip.", hc.job.num)  # fmt: skip
        sys.exit(1)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
