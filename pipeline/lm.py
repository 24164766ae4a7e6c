"""stage=lm: train the embedded task LM until it answers every task, then save it.

The model is saved with `save_pretrained` and its accuracy is measured after
loading it back through `AutoModelForCausalLM`, the path every later stage uses.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig
from torch.multiprocessing import ProcessRaisedException
from torch.utils.data import DataLoader, Sampler, TensorDataset
from transformers import DynamicCache

from geosteer.data.tasks import Prompt, Task, concept_schema
from geosteer.models.hub import FILE_MODE
from geosteer.models.lm import capture_residual, load_causal_lm, position_ids_for
from geosteer.models.tail import last_token_hidden
from geosteer.models.task_lm import build_task_lm, build_word_tokenizer
from geosteer.pipeline.common import (
    NonFiniteTraining,
    StageError,
    adamw_warmup_cosine,
    atomic_write_text,
    build,
    close_logger,
    load_tasks,
    log,
    make_logger,
    temp_files_in,
    to_plain,
    trim_log,
    worker_error,
)
from geosteer.pipeline.extract import centroid_swap_rate, extract_rows
from geosteer.pipeline.products import (
    FingerprintCheckpoints,
    RunLayout,
    check_inside,
    current_result,
    drop_leftovers,
    finish_replace,
    refuse_unrecorded,
    replace_dir,
    resume_checkpoint,
    stage_fingerprint,
    trained_seconds,
    trainer_facts,
    write_stamp,
)


class TaskLMSystem(L.LightningModule):
    """Next-token cross-entropy on the answer token; AdamW, linear warm-up, cosine decay.

    With `interchange > 0` a second term trains the answer to be *mediated* by
    block `layer`'s last-token residual (interchange intervention training,
    Geiger et al. 2022): each row's residual there is swapped with another
    row's, and the model must then give that other row's answer. Without it, the
    later blocks may read the answer's ingredients from the context directly, and
    replacing the residual (which is what steering does) moves nothing.
    """

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float, warmup_steps: int, max_steps: int,
                 layer: int = 0, interchange: float = 0.0):  # fmt: skip
        super().__init__()
        self.model = model
        self.save_hyperparameters(ignore=["model"])

    def training_step(self, batch, _batch_idx):
        input_ids, attention_mask, answer, soft = batch  # (B, T), (B, T), (B,), (B, V)
        keep = attention_mask.any(0)  # drop columns that are padding in every row
        input_ids, attention_mask = input_ids[:, keep], attention_mask[:, keep]
        hp = self.hparams
        # torch's global stream, seeded; a resume restores it (ResumableDraws)
        donor = torch.randperm(len(input_ids), device=input_ids.device) if hp.interchange else None
        logits, swapped = answer_logits(self.model, hp.layer, input_ids, attention_mask, donor)  # (B, V) each
        loss = F.cross_entropy(logits, soft)
        if hp.interchange:
            swap_loss = F.cross_entropy(swapped, soft[donor])
            loss = loss + hp.interchange * swap_loss
            self.log("train/swap_loss", swap_loss)
            self.log("train/swap_accuracy", (swapped.argmax(-1) == answer[donor]).float().mean(), prog_bar=True)
        if not torch.isfinite(loss):  # before the optimiser step writes it into the weights, or a checkpoint keeps it
            raise NonFiniteTraining(f"the task LM's loss is {loss.item()} at step {self.global_step}; training stopped "
                                    f"there. Lower lm.lr (or lm.interchange).")  # fmt: skip
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/accuracy", (logits.argmax(-1) == answer).float().mean(), prog_bar=True)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0])
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        return adamw_warmup_cosine(self.model.parameters(), hp.lr, hp.weight_decay, hp.warmup_steps, hp.max_steps)


def answer_logits(model, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  donor: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """Last-position logits, and with `donor` those when block `layer`'s last-token residual is the donor row's.

    The swapped forward reruns only the last token through the blocks after `layer`: the earlier
    positions' keys and values are those of the plain forward (causal attention), gradients and
    all, so it equals a whole second forward with the swap. Left-padded (B, T), (B, T), donor (B,)
    → (B, V), (B, V) or None
    """
    position_ids = position_ids_for(attention_mask)
    last = torch.full((len(input_ids),), input_ids.shape[1] - 1, device=input_ids.device)
    with capture_residual(model, layer, last) as captured:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    cache=DynamicCache() if donor is not None else None,  # every position (models.tail)
                    use_cache=donor is not None, logits_to_keep=1)  # fmt: skip
    if donor is None:
        return out.logits[:, -1], None
    prefix = [(c.keys[..., :-1, :], c.values[..., :-1, :]) for c in out.cache.layers]
    u = last_token_hidden(model, layer, captured["h"][donor], prefix, attention_mask[:, :-1].bool(), input_ids,
                          position_ids, captured["as_tuple"])  # fmt: skip
    return out.logits[:, -1], model.get_output_embeddings()(u)


def value_token(tokenizer, value: str) -> int:
    ids = tokenizer.encode(value, add_special_tokens=False)
    if len(ids) != 1:
        raise StageError(f"value {value!r} is not one token of the task LM's tokenizer; task values must be single words.")
    return ids[0]


def encode_prompts(tokenizer, prompts: list[tuple[Task, Prompt]], smoothing: float = 0.0, width: float = 1.0):
    """Left-padded prompt ids, the answer's token id, and the soft answer distribution over the vocabulary.

    The soft target spreads a mass m over the neighbouring values (`Task.neighbourhood`,
    std `width` value steps) and puts 1 − m on the answer. m grows with the step
    count, `smoothing · |number| / max |numbers|`: the further the count (either way), the less sure.
    """
    enc = tokenizer([p.text for _, p in prompts], padding=True, return_tensors="pt")
    tokens = {t.name: [value_token(tokenizer, v) for v in t.values] for t in {t.name: t for t, _ in prompts}.values()}
    answer = torch.tensor([tokens[t.name][t.values.index(p.answer)] for t, p in prompts])
    mass = torch.tensor([smoothing * abs(p.number) / (max(map(abs, t.numbers)) or 1) for t, p in prompts])
    soft = (1 - mass[:, None]) * F.one_hot(answer, len(tokenizer)).float()  # (N, V)
    for i, (task, p) in enumerate(prompts):
        for k, w in task.neighbourhood(task.values.index(p.answer), width).items():
            soft[i, tokens[task.name][k]] += mass[i] * w
    return TensorDataset(enc.input_ids, enc.attention_mask, answer, soft)


@torch.inference_mode()
def the_bar(model, tokenizer, tasks: list[Task], prompts: dict[str, list[Prompt]], layer: int, seed: int,
            batch_size: int = 512) -> dict[str, dict[str, float]]:  # fmt: skip
    """Per task, over its full prompt set: top-1 accuracy of the full-vocabulary next token on the answer,
    and the centroid-swap rate at block `layer` (how often writing a class centroid there makes that class
    the arg-max concept; `pipeline.extract.centroid_swap_rate`, the figure stage=extract reports)."""
    was_training = model.training
    model.eval()
    out = {}
    for task in tasks:
        ps = prompts[task.name]
        schema = concept_schema(task, tokenizer, "the task LM")
        rows = extract_rows(model, tokenizer, [p.text for p in ps], layer, schema.variant_ids, batch_size, "float32")
        answers = np.array([value_token(tokenizer, p.answer) for p in ps])
        labels = np.array([p.label for p in ps])
        swap = centroid_swap_rate(model, tokenizer, task, rows, labels, layer, schema.variant_ids, seed=seed)
        out[task.name] = {"accuracy": float((rows["top1"] == answers).mean()), "swap_rate": swap}
    model.train(was_training)
    return out


def clears(bar: dict[str, dict[str, float]], min_accuracy: float, min_swap_rate: float) -> bool:
    """Every task answers at `min_accuracy` or better and swaps centroids at `min_swap_rate` or better."""
    return all(b["accuracy"] >= min_accuracy and b["swap_rate"] >= min_swap_rate for b in bar.values())


class StopAtTheBar(L.Callback):
    """Every `every` steps, measure `the_bar` on the full prompt sets; stop training once every task clears it.

    The full measure runs only once the step's own batch is answered, with and without the swap, at
    `gate` × the accuracy bar or better: a model that far below it on its batch is below it on the
    full set, and a measure costs about as much as 25 steps.
    """

    def __init__(self, measure, min_accuracy: float, min_swap_rate: float, every: int, gate: float = 0.9):
        self.measure, self.bars, self.every, self.gate = measure, (min_accuracy, min_swap_rate), every, gate
        self.checked = 0  # the last step checked: with accumulated batches, a step ends several batches

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every or step <= self.checked:
            return
        self.checked = step
        metrics = trainer.callback_metrics
        batch = {k: float(metrics[k]) for k in ("train/accuracy", "train/swap_accuracy") if k in metrics}
        if min(batch.values(), default=0.0) < self.gate * self.bars[0]:
            log.info("task LM step %d: batch %s; not measured yet", step, {k: round(v, 3) for k, v in batch.items()})
            return
        with torch.random.fork_rng():  # the measure's loaders draw seeds: leave training's random stream alone
            bar = self.measure(pl_module.model)
        metrics = {f"bar/{k}_{task}": v for task, b in bar.items() for k, v in b.items()}
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        worst = min(bar, key=lambda t: (bar[t]["accuracy"], bar[t]["swap_rate"]))
        log.info("task LM step %d: lowest accuracy %.2f%% (%s), swap rate %.2f", step,
                 100 * bar[worst]["accuracy"], worst, min(b["swap_rate"] for b in bar.values()))  # fmt: skip
        if clears(bar, *self.bars):
            log.info("task LM clears the bar at step %d: stopping", step)
            trainer.should_stop = True


class ResumableSampler(Sampler[int]):
    """`num_samples` rows per epoch, drawn with replacement in proportion to `weights` from one seeded generator that
    runs on across epochs (as `WeightedRandomSampler` draws), and able to start an epoch part-way: a resume sets the
    generator to the epoch's start and skips the rows already trained on (`ResumableDraws`). Under DDP each process
    takes every W-th row (the rows padded with the first ones to a multiple of W), as Lightning's
    `DistributedSamplerWrapper` would hand them out, but skipping its own rows done."""

    def __init__(self, weights: torch.Tensor, num_samples: int, seed: int):
        self.weights, self.num_samples = weights, num_samples
        self.generator = torch.Generator().manual_seed(seed)
        self.epoch_start, self.skip = self.generator.get_state(), 0

    def __iter__(self) -> Iterator[int]:
        self.epoch_start, skip, self.skip = self.generator.get_state(), self.skip, 0
        rank, world = _process()
        rows = self.draw()
        rows = torch.cat([rows, rows[: len(self) * world - self.num_samples]])[rank::world]  # this process's
        yield from rows[skip:].tolist()

    def draw(self) -> torch.Tensor:
        """An epoch's rows, moving the generator on to the next epoch's start. (num_samples,)"""
        return torch.multinomial(self.weights, self.num_samples, replacement=True, generator=self.generator)

    def __getstate__(self) -> dict[str, Any]:  # a generator's state tensors pass to spawned DDP workers as shared
        return {**self.__dict__, "generator": self.generator.get_state().numpy(),  # files, which break for them
                "epoch_start": self.epoch_start.numpy()}  # fmt: skip

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, generator=torch.Generator(), epoch_start=torch.from_numpy(state["epoch_start"]))
        self.generator.set_state(torch.from_numpy(state["generator"]))

    def __len__(self) -> int:  # the whole epoch: Lightning counts a resumed epoch's batches on from where it stopped
        return math.ceil(self.num_samples / _process()[1])


def _process() -> tuple[int, int]:
    """(rank, world size) of this process in the fit's process group; (0, 1) outside one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ResumableDraws(L.Callback):
    """Keeps in each checkpoint what a resume needs to draw what an uninterrupted training would: the sampler's
    generator at the epoch's start, the batches of the epoch done, and torch's global generator (the interchange
    donors). Lightning restarts an interrupted epoch's data from its first batch and restores no generator. Under
    DDP every process starts from rank 0's checkpoint: the processes draw alike (a spawn starts them all from the
    launcher's generator state)."""

    def __init__(self, sampler: ResumableSampler, batch_size: int):
        self.sampler, self.batch_size, self.done, self.pending = sampler, batch_size, 0, None

    def on_train_epoch_start(self, *_) -> None:
        self.done = 0 if self.pending is None else self.done

    def on_train_batch_start(self, *_) -> None:
        if self.pending is not None:  # after the data loader's own draw at the epoch's start, as uninterrupted
            torch.set_rng_state(self.pending)
            self.pending = None

    def on_train_batch_end(self, *_) -> None:  # runs before ModelCheckpoint's save of this step
        self.done += 1

    def on_save_checkpoint(self, _trainer, _module, checkpoint: dict) -> None:
        checkpoint["draws"] = {"epoch_start": self.sampler.epoch_start, "done": self.done, "rng": torch.get_rng_state()}

    def on_load_checkpoint(self, _trainer, _module, checkpoint: dict) -> None:
        if (draws := checkpoint.get("draws")) is None:  # written before checkpoints kept them: resumed as Lightning does
            return
        self.sampler.generator.set_state(draws["epoch_start"])
        self.sampler.skip, self.done, self.pending = draws["done"] * self.batch_size, draws["done"], draws["rng"]
        if self.sampler.skip >= len(self.sampler):  # saved on the epoch's last batch: Lightning goes on to the next
            # epoch, whose rows start where the finished epoch's draw left the generator, and whose data loader draws
            # its seed from torch's generator as saved
            self.sampler.draw()
            self.sampler.skip = self.done = 0
            torch.set_rng_state(self.pending)
            self.pending = None


class LastStep(L.Callback):
    """Writes the training's last step to `path` (rank 0): spawned DDP workers do not hand it back."""

    def __init__(self, path: Path):
        self.path = path

    def on_train_end(self, trainer: L.Trainer, _module) -> None:
        if trainer.is_global_zero:
            atomic_write_text(self.path, str(trainer.global_step))


OTHER_FOLDERS = ("steer", "hydra", "csv", "wandb", "multirun")  # what else a run folder holds besides its products


def run(cfg: DictConfig, callbacks: Sequence[L.Callback] = ()) -> dict:
    """Train the embedded task LM and save it to `model.pretrained`; `callbacks` join the Lightning trainer."""
    if not cfg.model.embedded:
        raise StageError(
            f"stage=lm trains the embedded task LM, but model={cfg.model.name} is a pretrained model. "
            f"Run stage=extract directly, or pick model=task_lm."
        )
    tasks = load_tasks(cfg)
    out = Path(cfg.model.pretrained)
    layout = RunLayout.of(cfg)
    others = {"the run folder": layout.root, "the store's folder": layout.extract, "the targets' folder": layout.targets,
              "the geometries' folder": layout.geometries, "the evaluation's folder": layout.eval,
              **{f"the run's {name} folder": layout.root / name for name in OTHER_FOLDERS}}  # fmt: skip
    where, root = out.resolve(), layout.root.resolve()
    for what, folder in others.items():
        if where == folder.resolve() or folder.resolve().is_relative_to(where) or (
                folder != layout.root and where.is_relative_to(folder.resolve())):  # fmt: skip
            raise StageError(
                f"model.pretrained={cfg.model.pretrained} is {what} or holds it, or lies in it, and stage=lm writes the "
                f"LM there, replacing that folder whole. Leave model.pretrained at its default (${{paths.run_dir}}/lm)."
            )
    if where.is_relative_to(root) and where.parent != root:
        raise StageError(f"model.pretrained={cfg.model.pretrained} lies deeper in the run folder than its own folders; "
                         f"leave it at its default (${{paths.run_dir}}/lm).")  # fmt: skip
    check_inside(cfg.paths.run_dir, out, "stage=lm writes the embedded LM to model.pretrained: leave it at its default "
                 "(${paths.run_dir}/lm); an LM trained elsewhere is read with model.embedded=false.")  # fmt: skip
    # lm.checkpoint_every changes no weight (a resume is exact): held at its default, as fingerprints record it
    fp = stage_fingerprint({"lm": {**to_plain(cfg.lm), "checkpoint_every": 250}, "layer": cfg.model.layer,
                            "tasks": [t.to_dict() for t in tasks], "seed": cfg.seed, "trainer": trainer_facts(cfg)})  # fmt: skip
    work = out.with_name(f".{out.name}.partial-{fp}")  # checkpoints of an unfinished run live here
    finish_replace(out, work / "model", fp)
    refuse_unrecorded(out, "the task LM", cfg.overwrite, "model.pretrained=... with model.embedded=false reads it")
    if (done := current_result(out, fp, "the task LM", cfg.overwrite)) is not None:
        drop_leftovers(out, work)
        return done

    L.seed_everything(cfg.seed, workers=True)
    prompts = {t.name: t.prompts() for t in tasks}
    tokenizer = build_word_tokenizer(p.text + " " + p.answer for ps in prompts.values() for p in ps)
    for t in tasks:  # a value the vocabulary cannot tell apart is refused before training, not after
        concept_schema(t, tokenizer, "the task LM")
    a = cfg.lm
    model = build_task_lm(tokenizer, a.hidden_size, a.num_layers, a.num_heads, a.intermediate_size)
    data = encode_prompts(tokenizer, [(t, p) for t in tasks for p in prompts[t.name]], a.smoothing, a.smoothing_width)
    log.info("task LM: %d parameters, %d prompts over %s", model.num_parameters(), len(data), list(prompts))
    # Each task is drawn in proportion to its prompt count to the power lm.task_share_power:
    # 0 draws every task equally, 1 every prompt equally. Below 1, small tasks are not
    # starved by ages (4,725 prompts), which still gets the most.
    counts = torch.tensor([len(ps) for ps in prompts.values()], dtype=torch.float64)
    weights = torch.repeat_interleave(counts ** (a.task_share_power - 1), counts.long())
    system = TaskLMSystem(model, a.lr, a.weight_decay, a.warmup_steps, a.max_steps, cfg.model.layer, a.interchange)
    resume = resume_checkpoint(work / "checkpoints", "the task LM", system, fp)
    resumed = torch.load(resume, map_location="cpu", weights_only=True) if resume else None
    before = trained_seconds(resumed)
    sampler = ResumableSampler(weights, len(data), cfg.seed)
    loader = DataLoader(data, batch_size=a.batch_size, sampler=sampler)  # shards itself under DDP
    # The latest state every lm.checkpoint_every steps, always as last.ckpt (no monitor, top-1 by recency).
    checkpoint = ModelCheckpoint(dirpath=work / "checkpoints", filename="last", every_n_train_steps=a.checkpoint_every,
                                 enable_version_counter=False)  # fmt: skip
    measure = functools.partial(the_bar, tokenizer=tokenizer, tasks=tasks, prompts=prompts, layer=cfg.model.layer,
                                seed=cfg.seed)  # fmt: skip
    callbacks = [checkpoint, FingerprintCheckpoints(fp), ResumableDraws(sampler, a.batch_size),
                 LastStep(work / "steps"), *callbacks]  # fmt: skip
    if a.check_every:
        callbacks.append(StopAtTheBar(measure, a.min_accuracy, a.min_swap_rate, a.check_every))
    # Lightning's own files (a profiler's trace, say) go to default_root_dir: the run's work folder, not the cwd
    logger = make_logger(cfg, "lm", run_id_file=work / "run_id")
    trim_log(logger, resumed)
    # max_steps alone ends the training: an epoch's batches depend on the processes (DDP splits the rows)
    trainer = build(cfg, "trainer", max_steps=a.max_steps, max_epochs=-1, logger=logger, callbacks=callbacks,
                    use_distributed_sampler=False, default_root_dir=work)  # fmt: skip
    per_epoch = math.ceil(math.ceil(sampler.num_samples / trainer.world_size) / a.batch_size)  # each process's
    if trainer.accumulate_grad_batches > per_epoch:  # Lightning steps at each epoch's end: it would accumulate fewer
        if logger:
            close_logger(logger)
        raise StageError(
            f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches} is more than the task LM's "
            f"{per_epoch} batches per epoch{f' on each of {trainer.world_size} processes' if trainer.world_size > 1 else ''}"
            f", and Lightning steps at each epoch's end: it would accumulate {per_epoch}. Use at most {per_epoch}, or "
            f"a smaller lm.batch_size."
        )
    begin = time.perf_counter()
    with warnings.catch_warnings():  # ResumableDraws makes the restart of an interrupted epoch exact
        warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended")
        try:
            with temp_files_in(trainer, work / "tmp"):
                trainer.fit(system, loader, ckpt_path=resume, weights_only=True)
        except (NonFiniteTraining, ProcessRaisedException) as e:  # DDP workers' errors arrive wrapped
            if trainer.logger:
                close_logger(trainer.logger)
            raise StageError(f"training the task LM failed: {worker_error(e)}\nNothing was replaced; its checkpoints are kept in "
                             f"{work}.") from e  # fmt: skip
    train_seconds = before + time.perf_counter() - begin  # a resumed training's first part included
    steps = int((work / "steps").read_text())
    if broken := [n for n, p in model.named_parameters() if not p.isfinite().all()]:  # the last step's update
        raise StageError(f"the task LM's weights hold NaN or Inf after training ({broken[:3]}): lower lm.lr. Nothing "
                         f"was replaced.")  # fmt: skip

    final = work / "model"
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    for weights in final.glob("*.safetensors"):  # safetensors writes them owner-only
        os.chmod(weights, FILE_MODE)
    # Confirm the bar through the same loading path as any Hugging Face model.
    loaded, loaded_tok = load_causal_lm(str(final), dtype="float32")
    bar = measure(loaded, tokenizer=loaded_tok)
    for name, b in bar.items():
        log.info("task LM on %s: accuracy %.2f%%, centroid swap rate %.2f (%d prompts)", name, 100 * b["accuracy"],
                 b["swap_rate"], len(prompts[name]))  # fmt: skip
    if trainer.logger:
        trainer.logger.log_metrics({f"lm/{k}_{task}": v for task, b in bar.items() for k, v in b.items()},
                                   step=steps)  # fmt: skip
        close_logger(trainer.logger)

    if not clears(bar, a.min_accuracy, a.min_swap_rate):
        failed = {k: b for k, b in bar.items() if not clears({k: b}, a.min_accuracy, a.min_swap_rate)}
        raise StageError(
            f"after {steps} steps the task LM is below lm.min_accuracy={a.min_accuracy} or "
            f"lm.min_swap_rate={a.min_swap_rate} on {failed}. Train longer (lm.max_steps={2 * a.max_steps}) or widen it "
            f"(lm.hidden_size=...); nothing was replaced."
        )
    result = {
        "path": str(out),
        "accuracy": {k: b["accuracy"] for k, b in bar.items()},
        "swap_rate": {k: b["swap_rate"] for k, b in bar.items()},
        "train_seconds": round(train_seconds, 1),
        "steps": steps,
        "parameters": model.num_parameters(),
        "vocab_size": len(tokenizer),
        "config": to_plain(a),
    }
    write_stamp(final, "lm", fp, result, home=out)  # before the move: the product never lies in place without its record
    replace_dir(final, out)
    shutil.rmtree(work, ignore_errors=True)
    return result
