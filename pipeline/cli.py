"""`pipeline stage=<name> [overrides]`: a thin Hydra entry point around `run(cfg)`."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable

import hydra
from omegaconf import DictConfig

from pipeline import extract, lm
from pipeline.common import CONFIG_DIR, log

STAGES: dict[str, Callable[[DictConfig], dict]] = {"lm": lm.run, "extract": extract.run}


def run(cfg: DictConfig) -> dict:
    """Run one stage, or every stage in order for stage=all; returns each stage's result."""
    if cfg.stage == "all":
        names = [s for s in STAGES if s != "lm" or cfg.model.embedded]
        return {name: STAGES[name](cfg) for name in names}
    if cfg.stage not in STAGES:
        raise ValueError(f"stage '{cfg.stage}' is unknown; use one of {[*STAGES, 'all']}.")
    return {cfg.stage: STAGES[cfg.stage](cfg)}


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        result = run(cfg)
    except Exception as e:
        # The one catch-all: our errors already name the value and the fix, so show the message, not a trace.
        log.error("%s: %s", type(e).__name__, e)
        if log.isEnabledFor(logging.DEBUG):
            raise
        sys.exit(1)
    log.info("result:\n%s", json.dumps(result, indent=2, default=str))
