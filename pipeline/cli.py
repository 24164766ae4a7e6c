"""`pipeline stage=<name> [overrides]`: a thin Hydra entry point around `run(cfg)`."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable

import hydra
from omegaconf import DictConfig

from data.store import StoreError
from data.targets import TargetError
from data.tasks import TaskError
from models.lm import ModelLoadError
from pipeline import eval as evaluate
from pipeline import extract, lm, targets, train
from pipeline.common import CONFIG_DIR, StageError, log

# Errors whose message already names the bad value and the fix: shown without a traceback.
USER_ERRORS = (StageError, TaskError, StoreError, TargetError, ModelLoadError)

STAGES: dict[str, Callable[[DictConfig], dict]] = {
    "lm": lm.run,
    "extract": extract.run,
    "targets": targets.run,
    "train": train.run,
    "eval": evaluate.run,
}


def run(cfg: DictConfig) -> dict:
    """Run one stage, or every stage in order for stage=all; returns each stage's result."""
    if cfg.stage == "all":
        names = [s for s in STAGES if s != "lm" or cfg.model.embedded]
        return {name: STAGES[name](cfg) for name in names}
    if cfg.stage not in STAGES:
        raise StageError(f"stage '{cfg.stage}' is unknown; use one of {[*STAGES, 'all']}.")
    return {cfg.stage: STAGES[cfg.stage](cfg)}


def _finish_wandb(exit_code: int) -> None:
    """Close a W&B run left open by a failed stage, so its files are complete."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=exit_code)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        result = run(cfg)
    except Exception as e:
        _finish_wandb(exit_code=1)
        if not isinstance(e, USER_ERRORS) or log.isEnabledFor(logging.DEBUG):
            raise
        log.error("%s: %s", type(e).__name__, e)
        sys.exit(1)
    log.info("result:\n%s", json.dumps(result, indent=2, default=str))
