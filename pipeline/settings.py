"""Range checks of the settings, where the config is read: a value no stage can use is refused before any work.

`RULES` maps a dotted key (`*` stands for one name: a geometry, a method) to what its resolved value must be.
Keys without a rule are left to the stage that reads them (names of files, models and tasks are checked there).
"""

from __future__ import annotations

import fnmatch
import inspect
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.strategies import StrategyRegistry
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from geosteer.models.gaga import ACTIVATIONS
from geosteer.models.lm import DTYPES, device_map_fault
from geosteer.pipeline.common import StageError
from geosteer.pipeline.products import STAGE_FOLDERS

Rule = Callable[[Any], str | None]  # the value's fault, as "must be ...", or None when it is fine


def _device_list(v: list) -> str | None:
    """Why a list of GPU indices cannot be used here; None when every index names a GPU of this machine."""
    n = torch.cuda.device_count()
    if v and all(_is_int(i) and 0 <= i < n for i in v) and len(set(v)) == len(v):
        return None
    return (f"names GPU indices, but this machine has {n} GPU{'s' * (n != 1)}"
            f"{f' (0 ... {n - 1})' if n else ''}: list each once, or give a count (trainer.devices=1)")  # fmt: skip


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def integer(low: int, high: int | None = None, null: bool = False, words: tuple[str, ...] = ()) -> Rule:
    """An integer in [low, high] (high: none), or null, or one of `words`."""
    said = f"an integer ≥ {low}" + (f" and ≤ {high}" if high is not None else "")
    said += "".join(f" or {w}" for w in (*words, *(["null"] if null else [])))

    def rule(v: Any) -> str | None:
        if (v is None and null) or v in words:
            return None
        ok = _is_int(v) and v >= low and (high is None or v <= high)
        return None if ok else f"must be {said}"

    return rule


def number(low: float, high: float | None = None, open_low: bool = False, open_high: bool = False) -> Rule:
    """A finite number in the interval from low to high, each end open or closed."""
    said = f"a number {'>' if open_low else '≥'} {low}" + (f" and {'<' if open_high else '≤'} {high}" if high is not None else "")

    def rule(v: Any) -> str | None:
        if not _is_number(v):
            return f"must be {said}"
        ok = (v > low if open_low else v >= low) and (high is None or (v < high if open_high else v <= high))
        return None if ok else f"must be {said}"

    return rule


def each(inner: Rule, at_least: int = 1) -> Rule:
    """A list of at least `at_least` items, each passing `inner` (an int alone is taken as a one-item list)."""

    def rule(v: Any) -> str | None:
        items = [v] if _is_int(v) else v
        if not isinstance(items, list) or len(items) < at_least:
            return f"must be a list of at least {at_least} item(s)"
        faults = [f for f in map(inner, items) if f]
        return f"has an item that {faults[0]}" if faults else None

    return rule


def one_of(*choices: Any) -> Rule:
    return lambda v: None if v in choices else f"must be one of {list(choices)}"


# The Lightning precisions geosteer trains in: full float32, or mixed precision on a GPU (half-precision weights
# ("16-true") break the distance losses, whose pdist has no float16 kernel on the CPU).
PRECISIONS = ("32-true", "32", 32, "bf16-mixed", "16-mixed")
GPU_PRECISIONS = ("bf16-mixed", "16-mixed")
# What a trainer config may set: Lightning's Trainer arguments, but those that skip or cut training or validation
# (every stage validates each epoch, checkpoints it, and reads back what it saved).
TRAINER_FIXED = ("fast_dev_run", "limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches",
                 "overfit_batches", "val_check_interval", "check_val_every_n_epoch", "num_sanity_val_steps",
                 "barebones", "callbacks", "max_epochs", "max_steps", "max_time", "logger", "default_root_dir",
                 "min_epochs", "min_steps", "use_distributed_sampler")  # fmt: skip
TRAINER_ARGUMENTS = set(inspect.signature(Trainer.__init__).parameters) - {"self", *TRAINER_FIXED}
POSITIVE = number(0, open_low=True)
NON_NEGATIVE = number(0)
SIZE = integer(1)
TEXT: Rule = lambda v: None if isinstance(v, (str, int, float)) and not isinstance(v, bool) else "must be a text (quote it)"  # noqa: E731
PATH: Rule = lambda v: None if isinstance(v, str) and v.strip() else "must be a path (a non-empty string)"  # noqa: E731

RULES: dict[str, Rule] = {
    "paths.outputs": PATH,
    "paths.run_dir": PATH,
    "model.pretrained": PATH,
    "eval.geometry_dir": PATH,
    "steer.geometry": PATH,
    "seed": integer(0, 2**32 - 1),
    "overwrite": one_of(True, False),
    "steer.prompt": TEXT,
    "steer.target": TEXT,
    "steer.alpha": number(0, 1),
    "steer.method": one_of("geometry", "linear", "caa"),
    "steer.every_token": one_of(True, False),
    "steer.max_new_tokens": SIZE,
    "steer.figure_points": integer(2, 101),
    "max_epochs_cap": integer(1, null=True),
    "model.layer": integer(0),
    "model.dtype": one_of(*DTYPES),
    "model.embedded": one_of(True, False),
    "model.trust_remote_code": one_of(True, False),
    "model.device_map": device_map_fault,
    "extract.batch_size": SIZE,
    "extract.chunk_size": SIZE,
    "extract.h_dtype": one_of("float32", "float16"),
    "extract.compression": one_of("none", "gzip", "lzf"),
    "extract.device": one_of("auto", "cpu", "cuda"),
    "extract.classes": one_of("argmax", "answer"),
    "extract.min_class_rows": SIZE,
    "targets.val_fraction": number(0, 1, open_low=True, open_high=True),
    "targets.pair_samples": integer(2),
    "targets.figures": one_of(True, False),
    "targets.phate.knn": SIZE,
    "targets.phate.decay": POSITIVE,
    "targets.phate.t": integer(1, words=("auto",)),
    "targets.phate.t_max": integer(3),  # the knee of the entropy needs 4 values (t = 0 … t_max)
    "targets.phate.n_pca": integer(2, null=True),
    "targets.phate.exact_max": SIZE,
    "targets.phate.n_landmark": integer(2),
    "targets.phate.n_jobs": integer(-1),
    "targets.pullback.rank": integer(0),
    "targets.pullback.max_batch": SIZE,
    "lm.hidden_size": SIZE,
    "lm.num_layers": SIZE,
    "lm.num_heads": SIZE,
    "lm.intermediate_size": SIZE,
    "lm.max_steps": SIZE,
    "lm.batch_size": SIZE,
    "lm.checkpoint_every": SIZE,
    "lm.task_share_power": NON_NEGATIVE,
    "lm.lr": POSITIVE,
    "lm.weight_decay": NON_NEGATIVE,
    "lm.warmup_steps": integer(0),
    "lm.smoothing": number(0, 1, open_high=True),
    "lm.smoothing_width": NON_NEGATIVE,
    "lm.interchange": NON_NEGATIVE,
    "lm.min_accuracy": number(0, 1),
    "lm.min_swap_rate": number(0, 1),
    "lm.check_every": integer(0),
    "geometry.*.target": one_of("hellinger", "phate"),
    "geometry.*.activation": one_of(*ACTIVATIONS),
    "geometry.*.latent_dim": integer(1, null=True),
    "geometry.*.hidden": each(SIZE),
    "geometry.*.pca_dim": integer(2, null=True),
    "geometry.*.batch_norm": one_of(True, False),
    "geometry.*.loss.*": NON_NEGATIVE,
    "geometry.*.optim.lr": POSITIVE,
    "geometry.*.optim.weight_decay": NON_NEGATIVE,
    "geometry.*.optim.warmup_fraction": number(0, 1, open_high=True),
    "geometry.*.optim.grad_clip": POSITIVE,
    "geometry.*.batch_size": integer(2),
    "geometry.*.min_steps_per_epoch": SIZE,
    "geometry.*.max_epochs": SIZE,
    "geometry.*.patience": integer(0),
    "geometry.*.num_workers": integer(0),
    "geometry.*.num_blocks": SIZE,
    "geometry.*.depth": SIZE,
    "geometry.*.clamp": POSITIVE,
    "geometry.*.centres": one_of("argmax", "soft"),
    "geometry.*.noise": NON_NEGATIVE,
    "geometry.*.steering.alpha": NON_NEGATIVE,
    "geometry.*.steering.carriers": SIZE,
    "geometry.*.steering.max_pairs": SIZE,
    "geometry.*.steering.all_pairs_max_k": integer(0),
    "geometry.*.times": integer(2),
    "geometry.*.knn": SIZE,
    "geometry.*.lam_rel": POSITIVE,
    "geometry.*.eval.pairs": SIZE,
    "geometry.*.eval.steps": integer(2),
    "eval.steps": integer(2),
    "eval.carriers": SIZE,
    "eval.max_pairs": SIZE,
    "eval.all_pairs_max_k": integer(0),
    "eval.threshold": number(0, 1, open_low=True, open_high=True),
    "eval.max_steps": SIZE,
    "eval.budget_between": SIZE,
    "eval.lam_rel": number(0, 1e3, open_low=True),  # beyond 1000 × the metric's scale every pullback path is the chord
    "eval.lbfgs.max_iter": SIZE,
    "eval.lbfgs.history_size": SIZE,
    "eval.max_iter_cap": integer(1, null=True),
    "eval.alignment.points": integer(2),
    "eval.alignment.neighbours": SIZE,
    "eval.alignment.fisher_top_k": integer(1, null=True),
    "eval.own_point.alphas": each(NON_NEGATIVE),
    "eval.own_point.max_carriers": integer(2),
    "eval.figures": one_of(True, False),
    "trainer.devices": lambda v: (
        _device_list(v)
        if isinstance(v, list)
        else None
        if v == "auto" or (_is_int(v) and (v >= 1 or v == -1))
        else "must be an integer ≥ 1, -1 (every device), a list of device indices or auto"
    ),
    "trainer.num_nodes": SIZE,
    "trainer.enable_checkpointing": lambda v: (
        None if v is True else "must be true: every training stage checkpoints, to resume after a crash"
    ),
    "trainer.accelerator": one_of("auto", "cpu", "gpu", "cuda"),
    "trainer.precision": one_of(*PRECISIONS),
    "trainer.log_every_n_steps": SIZE,
    "trainer.accumulate_grad_batches": SIZE,
    "trainer.reload_dataloaders_every_n_epochs": integer(0),
    "trainer.gradient_clip_val": lambda v: None if v is None or (_is_number(v) and v > 0) else "must be a number > 0 or null",
    "logger.flush_logs_every_n_steps": SIZE,
    "method.*.pca": integer(2),
    "method.*.spline_pca": integer(2),
    "method.*.max_batch": SIZE,
    "method.*.alpha": POSITIVE,
    "method.dual.top_k": integer(1),  # its own key: only FishBack takes null (the whole vocabulary)
    "method.*.top_k": integer(1, null=True),
    "method.*.step_length": POSITIVE,
    "method.*.lam": POSITIVE,
}


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of a plain config tree; lists are values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}.{key}".lstrip(".")).items()}


def rule_of(key: str) -> Rule | None:
    """The rule of a dotted key: its own, else the first pattern whose `*`s each stand for one name."""
    if key in RULES:
        return RULES[key]
    parts = key.split(".")
    for pattern, rule in RULES.items():
        names = pattern.split(".")
        if len(names) == len(parts) and all(fnmatch.fnmatchcase(p, n) for p, n in zip(parts, names)):
            return rule
    return None


def resolve(cfg: DictConfig) -> dict[str, Any]:
    """The config with every interpolation resolved; StageError naming the key whose `${...}` fails."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise StageError(
            f"{key} cannot be resolved: {getattr(e, 'msg', str(e)).splitlines()[0]}. Fix that interpolation "
            f"(`${{...}}`) or give {key} a plain value, e.g. {key}=..."
        ) from None


def check_settings(cfg: DictConfig, defaults: DictConfig | None = None) -> None:
    """Refuse every setting outside its range, all at once, each with the default as an example."""
    plain = resolve(cfg)
    known = flatten(OmegaConf.to_container(defaults, resolve=False)) if defaults is not None else {}
    faults, flat = [], flatten(plain)
    for key, value in flat.items():
        if (rule := rule_of(key)) is not None and (fault := rule(value)) is not None:
            example = f"; the default is {key}={_show(known[key])}" if key in known else ""
            faults.append(f"{key}={_show(value)} {fault}{example}")
    faults += cross_faults(plain)
    for key in hydra_keys(plain):
        faults.append(f"{key}: geosteer builds the trainer and the logger from their configs' classes alone, and "
                      f"passes every other setting as a plain value; remove it (a Lightning profiler, say, "
                      f"is named by its string: trainer.profiler=simple)")  # fmt: skip
    for key in ("trainer._target_", "logger._target_"):  # the class Hydra builds: only the config groups pick it
        if key in known and flat.get(key) != known[key]:
            group = key.split(".")[0]
            faults.append(f"{key}={_show(flat.get(key))} cannot change; pick a {group} config instead ({group}=..., "
                          f"configs/{group}/)")  # fmt: skip
    for key, family in known.items():  # a geometry's settings are its family's: the family comes with its file
        if fnmatch.fnmatchcase(key, "geometry.*.family") and (now := flat.get(key, family)) != family:
            name = key.split(".")[1]
            faults.append(f"{key}={_show(now)} cannot change: geometry '{name}' is a {family} geometry, whose settings "
                          f"come from configs/geometry/{name}.yaml; pick a geometry of family {_show(now)} "
                          f"(geometry=[...]), or add a YAML for a new one")  # fmt: skip
    if faults:
        raise StageError("settings out of range: " + "; ".join(faults) + ".")


def hydra_keys(plain: dict[str, Any]) -> list[str]:
    """Keys under trainer and logger that Hydra's instantiate would act on (`_target_`, `_args_`, `_partial_`, ...),
    but the section's own `_target_`: each would build or call whatever it names."""

    def walk(node: Any, key: str, top: bool) -> Iterator[str]:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in items:
            name = f"{key}.{k}" if isinstance(node, dict) else f"{key}[{k}]"
            if isinstance(k, str) and k.startswith("_") and k.endswith("_") and not (top and k == "_target_"):
                yield name
            yield from walk(v, name, False)

    return [k for section in ("trainer", "logger") for k in walk(plain.get(section) or {}, section, True)]


def cross_faults(plain: dict[str, Any]) -> list[str]:
    """Settings that are each in range but do not fit together."""
    faults, lm, model = [], plain.get("lm") or {}, plain.get("model") or {}
    heads, width, blocks, layer = lm.get("num_heads"), lm.get("hidden_size"), lm.get("num_layers"), model.get("layer")
    if _is_int(width) and _is_int(heads) and heads >= 1 and width % heads:
        faults.append(f"lm.num_heads={heads} must divide lm.hidden_size={width}")
    if model.get("embedded") is True and model.get("gguf") is not None:
        faults.append("model.gguf names a GGUF file to load, but the embedded LM is this run's own (model.embedded=true): "
                      "pick a model that ships one (model=smollm2) instead of adding model.gguf")  # fmt: skip
    if model.get("gguf") is not None and model.get("revision") is not None:
        faults.append(f"model.revision={_show(model['revision'])} picks a Hub revision, but model={model.get('name')} "
                      f"loads a GGUF file shipped in a package (model.gguf), which has none: leave model.revision at "
                      f"null")  # fmt: skip
    if model.get("embedded") is True and model.get("revision") is not None:
        faults.append(f"model.revision={_show(model['revision'])} picks a Hub revision, but the embedded LM is this run's "
                      f"own (model.embedded=true): leave model.revision at null")  # fmt: skip
    if model.get("embedded") and _is_int(blocks) and _is_int(layer) and layer >= blocks:
        faults.append(f"model.layer={layer} must be below lm.num_layers={blocks}, the embedded LM's block count")
    trainer = plain.get("trainer") or {}
    wants_gpu = {"trainer.accelerator": trainer.get("accelerator") in ("gpu", "cuda"),
                 "trainer.precision": trainer.get("precision") in GPU_PRECISIONS,
                 "extract.device": (plain.get("extract") or {}).get("device") == "cuda"}  # fmt: skip
    for key, wants in wants_gpu.items():
        if wants and not torch.cuda.is_available():
            faults.append(f"{key} asks for a CUDA GPU, but none is visible to torch (use trainer=cpu and "
                          f"extract.device=auto on this machine)")  # fmt: skip
    if fixed := sorted(set(trainer) & set(TRAINER_FIXED)):
        faults.append(f"{', '.join('trainer.' + k for k in fixed)}: set by the stages themselves (each trains its full "
                      f"schedule, validates and checkpoints every epoch); remove them, and shorten training with "
                      f"max_epochs_cap=N or the geometry's max_epochs (the task LM's: lm.max_steps)")  # fmt: skip
    if unknown := sorted(set(trainer) - {"_target_"} - TRAINER_ARGUMENTS - set(TRAINER_FIXED)):
        faults.append(f"{', '.join('trainer.' + k for k in unknown)}: not arguments of Lightning's Trainer; remove them")
    strategies = ["auto", *StrategyRegistry.available_strategies()]
    if "strategy" in trainer and trainer["strategy"] not in strategies:
        faults.append(f"trainer.strategy={_show(trainer['strategy'])} must be one of Lightning's strategies, e.g. "
                      f"auto, ddp or ddp_spawn")  # fmt: skip
    faults += distributed_faults(trainer)
    logger, run_dir = plain.get("logger") or {}, Path(str((plain.get("paths") or {}).get("run_dir")))
    save_dir = logger.get("save_dir")
    if logger.get("_target_") and save_dir is not None:
        inside = Path(str(save_dir)).resolve()
        if not inside.is_relative_to(run_dir.resolve()):
            faults.append(f"logger.save_dir={save_dir} must be inside the run folder {run_dir}, like the default")
        elif (parts := inside.relative_to(run_dir.resolve()).parts) and parts[0] in STAGE_FOLDERS or (
                not parts and "Wandb" not in str(logger["_target_"])):  # fmt: skip
            faults.append(f"logger.save_dir={save_dir} puts the logs among the stages' products (a stage replaces "
                          f"its folder whole, logs in it included: {', '.join(STAGE_FOLDERS)}); pick a folder of "
                          f"its own, like the default ({run_dir}/csv for logger=csv)")  # fmt: skip
    if logger.get("_target_") and logger.get("dir") is not None:
        faults.append(f"logger.dir={_show(logger['dir'])}: the logs' folder is logger.save_dir (which overrides "
                      f"dir); set logger.save_dir inside the run instead")  # fmt: skip
    for key in ("name", "version", "id", "resume"):
        if logger.get("_target_") and logger.get(key) is not None:
            faults.append(f"logger.{key}={_show(logger[key])} is set by geosteer: each stage logs under its own name "
                          f"(lm, extract, train-<task>-<geometry>, eval) and a resumed stage goes on in its own "
                          f"version; remove logger.{key}")  # fmt: skip
    return faults


def distributed_faults(trainer: dict[str, Any]) -> list[str]:
    """Device and node counts that would hang or fail: Lightning's subprocess launcher (several devices without a
    spawning or forking strategy: auto, ddp, fsdp, ...) re-runs the command with Hydra overrides of its own, and
    several nodes wait for the others."""
    faults, devices, strategy = [], trainer.get("devices", 1), trainer.get("strategy", "auto")
    launched = any(k in os.environ for k in ("WORLD_SIZE", "SLURM_NTASKS"))
    many = devices == -1 or (_is_int(devices) and devices > 1) or (isinstance(devices, list) and len(devices) > 1)
    spawns = isinstance(strategy, str) and strategy in StrategyRegistry and (
        StrategyRegistry[strategy]["init_params"].get("start_method") in ("spawn", "fork"))  # fmt: skip
    if many and not launched and not spawns:
        faults.append(f"trainer.devices={_show(devices)} with trainer.strategy={_show(strategy)} has Lightning start "
                      f"copies of this command itself, which geosteer does not run; take trainer=ddp (GPUs) or "
                      f"trainer=ddp_sim (CPU processes), which spawn their workers, or start the processes with "
                      f"torchrun and trainer=ddp_launched")  # fmt: skip
    if trainer.get("accelerator") == "cpu" and devices == -1:
        faults.append("trainer.devices=-1 counts GPUs, but trainer.accelerator=cpu: give the number of CPU processes "
                      "(trainer.devices=2 with trainer=ddp_sim)")  # fmt: skip
    nodes = trainer.get("num_nodes", 1)
    if _is_int(nodes) and nodes > 1 and not launched:
        faults.append(f"trainer.num_nodes={nodes} waits for processes on other machines, which this command does not "
                      f"start: launch it on each node with torchrun (trainer=ddp_launched, docs/scaling.md), or leave "
                      f"trainer.num_nodes at 1")  # fmt: skip
    return faults


def _show(v: Any) -> str:
    if isinstance(v, list):
        return "[" + ",".join(map(_show, v)) + "]"
    if v == "":
        return "''"  # an empty text, seen
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v).replace("\n", "\\n")
