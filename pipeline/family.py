"""Geometry families: one contract, one registry, and the Lightning base every family's system shares.

A family is one class registered here by name (the `family:` of a geometry YAML in `configs/geometry/`)
that tells `pipeline.train` how to check a config, build the network, build its training system, score
the trained network and describe it in its model card. The network it ships subclasses
`geosteer.models.hub.ShippedGeometry` with the same family name, so `load_geometry` finds it.

The training system subclasses `GeometrySystem`, which owns the optimiser (AdamW), the schedule (linear
warm-up, cosine decay) and the logging; a family's system only computes its loss terms.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Protocol

import lightning as L
import torch
from omegaconf import DictConfig
from torch import nn

from geosteer.data.targets import PairwiseTargets
from geosteer.data.tasks import Task
from geosteer.pipeline.common import NonFiniteTraining, adamw_warmup_cosine

Terms = dict[str, torch.Tensor]  # name → scalar; "loss" is the one minimised


class GeometrySystem(L.LightningModule):
    """The shared half of a family's training system.

    A subclass saves its hyperparameters (`lr`, `weight_decay`, `warmup_fraction` among them) and defines
    `training_terms`; `validation_terms` defaults to the same. Every term is logged as `train/<name>` or
    `val/<name>`; every parameter that requires a gradient is trained.
    """

    label: ClassVar[str] = "the geometry's"  # whose loss a message names
    diverged_fix: ClassVar[str] = "Lower optim.lr"  # what to change when the loss is no longer finite

    def training_terms(self, batch: dict[str, torch.Tensor]) -> tuple[Terms, int]:
        """The loss terms of one batch (with "loss") and the batch size they average over."""
        raise NotImplementedError

    def validation_terms(self, batch: dict[str, torch.Tensor]) -> tuple[Terms, int]:
        return self.training_terms(batch)

    def training_step(self, batch, _batch_idx):
        terms, n = self.training_terms(batch)
        self.refuse_non_finite(terms["loss"], "loss")
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, on_step=False, on_epoch=True, batch_size=n)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0], on_step=False, on_epoch=True)
        return terms["loss"]

    def validation_step(self, batch, _batch_idx):
        terms, n = self.validation_terms(batch)
        self.refuse_non_finite(terms["loss"], "validation loss")
        self.log_dict({f"val/{k}": v for k, v in terms.items()}, sync_dist=True, batch_size=n)

    def refuse_non_finite(self, value: torch.Tensor, what: str) -> None:
        """NonFiniteTraining when a loss (or gradient norm) is NaN or inf: raised before the optimiser step writes it
        into the weights, and before an epoch's checkpoint would keep weights that give it."""
        if not torch.isfinite(value):
            raise NonFiniteTraining(
                f"{self.label} {what} is {value.item()} at step {self.global_step} (epoch {self.current_epoch}); "
                f"training stopped there, before an optimiser step or a checkpoint could keep it. {self.diverged_fix}."
            )

    def configure_optimizers(self):
        hp = self.hparams
        total = int(self.trainer.estimated_stepping_batches)
        trained = [p for p in self.parameters() if p.requires_grad]
        return adamw_warmup_cosine(trained, hp.lr, hp.weight_decay, max(1, round(hp.warmup_fraction * total)), total)


class GeometryFamily(Protocol):
    """What `pipeline.train` asks of a family. `g` is one geometry's config as a plain dict."""

    monitor: ClassVar[str]  # the val metric that picks the best checkpoint and stops early (a config's `monitor` wins)
    trains_against: ClassVar[tuple[str, ...]]  # roles of other exports it needs (trained first), e.g. ("encoder",)

    def check(self, name: str, g: dict[str, Any]) -> None:
        """Refuse settings that cannot train, naming the fix (StageError)."""

    def needs(self, cfg: DictConfig, task: Task, name: str, g: dict[str, Any]) -> dict[str, Path]:
        """The exported geometries it trains against: {role: folder}."""

    def uses_pullback(self, g: dict[str, Any]) -> bool:
        """Its batches need the output-pullback factors of the targets file ("pullback")."""

    def build(self, g: dict[str, Any], d: int, K: int, meta: dict[str, Any], seed: int) -> tuple[nn.Module, dict[str, Any]]:
        """The untrained network and its constructor arguments (they go to config.json)."""

    def system(self, model: nn.Module, g: dict[str, Any], train: PairwiseTargets, K: int) -> GeometrySystem:
        """The training system of a network whose normalisation is fitted."""

    def evaluate(self, cfg: DictConfig, task: Task, g: dict[str, Any], model: nn.Module, train: PairwiseTargets,
                 val: PairwiseTargets, folder: Path) -> dict[str, Any]:  # fmt: skip
        """Final metrics of the trained network; draws `folder/training.png`."""

    def headline(self, metrics: dict[str, Any]) -> dict[str, float]:
        """The few metrics a summary shows."""

    def card(self, ctor: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
        """The model card's parts: `models.hub.model_card`'s keyword arguments."""


class Family:
    """Defaults for a family: nothing to check, trains against nothing, no output-pullback targets."""

    trains_against: ClassVar[tuple[str, ...]] = ()

    def check(self, name: str, g: dict[str, Any]) -> None:
        return None

    def needs(self, cfg: DictConfig, task: Task, name: str, g: dict[str, Any]) -> dict[str, Path]:
        return {}

    def uses_pullback(self, g: dict[str, Any]) -> bool:
        return False


def rounded(metrics: dict[str, Any], keys: tuple[str, ...]) -> dict[str, float | None]:
    """`keys` of `metrics` to 4 decimals, for a headline; a metric with no value (None as an export stores a NaN)
    stays None."""
    return {k: None if metrics[k] is None else round(metrics[k], 4) for k in keys if k in metrics}


FAMILIES: dict[str, GeometryFamily] = {}


def register_family(name: str):
    """Class decorator: the family that geometry configs with `family: <name>` train with."""

    def add(cls: type) -> type:
        FAMILIES[name] = cls()
        return cls

    return add
