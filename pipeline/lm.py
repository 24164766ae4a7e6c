"""stage=lm: train the embedded task LM until it answers every task, then save it.

The model is saved with `save_pretrained` and its accuracy is measured after
loading it back through `AutoModelForCausalLM`, the path every later stage uses.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

from data.tasks import Prompt, Task
from models.lm import capture_residual, load_causal_lm, position_ids_for, replace_last_token
from models.task_lm import build_task_lm, build_word_tokenizer
from pipeline.common import (
    StageError,
    adamw_warmup_cosine,
    close_logger,
    current_result,
    fingerprint,
    load_tasks,
    log,
    make_logger,
    replace_dir,
    resume_checkpoint,
    to_plain,
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

    def answer_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last-position logits. (B, T), (B, T) → (B, V)"""
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_for(attention_mask),
            use_cache=False,
            logits_to_keep=1,
        ).logits[:, -1]

    def swapped_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Last-position logits when block `layer`'s output at the last position is h. (B, T), (B, T), (B, d) → (B, V)"""
        with replace_last_token(self.model, self.hparams.layer, h):
            return self.answer_logits(input_ids, attention_mask)

    def training_step(self, batch, _batch_idx):
        input_ids, attention_mask, answer, soft = batch  # (B, T), (B, T), (B,), (B, V)
        keep = attention_mask.any(0)  # drop columns that are padding in every row
        input_ids, attention_mask = input_ids[:, keep], attention_mask[:, keep]
        hp = self.hparams
        last = torch.full((len(input_ids),), input_ids.shape[1] - 1, device=input_ids.device)  # left padding
        with capture_residual(self.model, hp.layer, last) as captured:
            logits = self.answer_logits(input_ids, attention_mask)  # (B, V)
        loss = F.cross_entropy(logits, soft)
        if hp.interchange:
            donor = torch.randperm(len(input_ids), device=input_ids.device)  # seeded by seed_everything
            swapped = self.swapped_logits(input_ids, attention_mask, captured["h"][donor])  # should answer as the donor
            swap_loss = F.cross_entropy(swapped, soft[donor])
            loss = loss + hp.interchange * swap_loss
            self.log("train/swap_loss", swap_loss)
            self.log("train/swap_accuracy", (swapped.argmax(-1) == answer[donor]).float().mean(), prog_bar=True)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/accuracy", (logits.argmax(-1) == answer).float().mean(), prog_bar=True)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0])
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        return adamw_warmup_cosine(self.model.parameters(), hp.lr, hp.weight_decay, hp.warmup_steps, hp.max_steps)


def value_token(tokenizer, value: str) -> int:
    ids = tokenizer.encode(value, add_special_tokens=False)
    if len(ids) != 1:
        raise StageError(f"value {value!r} is not one token of the task LM's tokenizer; task values must be single words.")
    return ids[0]


def encode_prompts(tokenizer, prompts: list[tuple[Task, Prompt]], smoothing: float = 0.0, width: float = 1.0):
    """Left-padded prompt ids, the answer's token id, and the soft answer distribution over the vocabulary.

    The soft target spreads a mass m over the neighbouring values (`Task.neighbourhood`,
    std `width` value steps) and puts 1 − m on the answer. m grows with the step
    count, `smoothing · number / max(numbers)`: the further the count, the less sure.
    """
    enc = tokenizer([p.text for _, p in prompts], padding=True, return_tensors="pt")
    tokens = {t.name: [value_token(tokenizer, v) for v in t.values] for t in {t.name: t for t, _ in prompts}.values()}
    answer = torch.tensor([tokens[t.name][t.values.index(p.answer)] for t, p in prompts])
    mass = torch.tensor([smoothing * p.number / max(t.numbers) for t, p in prompts])
    soft = (1 - mass[:, None]) * F.one_hot(answer, len(tokenizer)).float()  # (N, V)
    for i, (task, p) in enumerate(prompts):
        for k, w in task.neighbourhood(task.values.index(p.answer), width).items():
            soft[i, tokens[task.name][k]] += mass[i] * w
    return TensorDataset(enc.input_ids, enc.attention_mask, answer, soft)


@torch.inference_mode()
def answer_accuracy(model, tokenizer, prompts: list[tuple[Task, Prompt]], batch_size: int = 256) -> float:
    """Top-1 accuracy of the full-vocabulary next token on the answer."""
    data = encode_prompts(tokenizer, prompts)
    correct = 0
    for ids, mask, answer, _ in DataLoader(data, batch_size=batch_size):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask), logits_to_keep=1).logits
        correct += int((logits[:, -1].argmax(-1) == answer).sum())
    return correct / len(prompts)


def run(cfg: DictConfig) -> dict:
    if not cfg.model.embedded:
        raise StageError(
            f"stage=lm trains the embedded task LM, but model={cfg.model.name} is a pretrained model. "
            f"Run stage=extract directly, or pick model=task_lm."
        )
    tasks = load_tasks(cfg)
    out = Path(cfg.model.pretrained)
    fp = fingerprint({"lm": cfg.lm, "layer": cfg.model.layer, "tasks": [t.to_dict() for t in tasks], "seed": cfg.seed})
    if (done := current_result(out, fp, "the task LM", cfg.overwrite)) is not None:
        return done
    work = out.with_name(f".{out.name}.partial-{fp}")  # checkpoints of an unfinished run live here

    L.seed_everything(cfg.seed, workers=True)
    prompts = {t.name: t.prompts() for t in tasks}
    tokenizer = build_word_tokenizer(p.text + " " + p.answer for ps in prompts.values() for p in ps)
    a = cfg.lm
    model = build_task_lm(tokenizer, a.hidden_size, a.num_layers, a.num_heads, a.intermediate_size)
    data = encode_prompts(tokenizer, [(t, p) for t in tasks for p in prompts[t.name]], a.smoothing, a.smoothing_width)
    log.info("task LM: %d parameters, %d prompts over %s", model.num_parameters(), len(data), list(prompts))
    # Each task is drawn in proportion to the square root of its prompt count, so that
    # small tasks are not starved by ages (4,725 prompts) and ages still gets the most.
    counts = torch.tensor([len(ps) for ps in prompts.values()], dtype=torch.float64)
    weights = torch.repeat_interleave(counts.rsqrt(), counts.long())
    sampler = WeightedRandomSampler(weights, num_samples=len(data), generator=torch.Generator().manual_seed(cfg.seed))
    loader = DataLoader(data, batch_size=a.batch_size, sampler=sampler)

    system = TaskLMSystem(model, a.lr, a.weight_decay, a.warmup_steps, a.max_steps, cfg.model.layer, a.interchange)
    # The latest state every 250 steps, always as last.ckpt (no monitor, top-1 by recency).
    checkpoint = ModelCheckpoint(
        dirpath=work / "checkpoints", filename="last", every_n_train_steps=250, enable_version_counter=False
    )
    trainer = instantiate(cfg.trainer, max_steps=a.max_steps, logger=make_logger(cfg, "lm"), callbacks=[checkpoint])
    resume = resume_checkpoint(work / "checkpoints" / "last.ckpt", "the task LM")
    start = time.perf_counter()
    trainer.fit(system, loader, ckpt_path=resume, weights_only=True)
    train_seconds = time.perf_counter() - start

    final = work / "model"
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    # Measure through the same loading path as any Hugging Face model.
    loaded, loaded_tok = load_causal_lm(str(final), dtype="float32")
    accuracy = {t.name: answer_accuracy(loaded, loaded_tok, [(t, p) for p in prompts[t.name]]) for t in tasks}
    for name, acc in accuracy.items():
        log.info("task LM accuracy on %s: %.2f%% (%d prompts)", name, 100 * acc, len(prompts[name]))
    if trainer.logger:
        trainer.logger.log_metrics({f"lm/accuracy_{k}": v for k, v in accuracy.items()})
        close_logger(trainer.logger)

    failed = {k: v for k, v in accuracy.items() if v < a.min_accuracy}
    if failed:
        raise StageError(
            f"the task LM answers below lm.min_accuracy={a.min_accuracy} on {failed}. "
            f"Train longer (lm.max_steps={2 * a.max_steps}) or widen it (lm.hidden_size=...); nothing was replaced."
        )
    result = {
        "path": str(out),
        "accuracy": accuracy,
        "train_seconds": round(train_seconds, 1),
        "steps": a.max_steps,
        "parameters": model.num_parameters(),
        "vocab_size": len(tokenizer),
        "config": to_plain(a),
    }
    replace_dir(final, out)
    write_stamp(out, "lm", fp, result)
    shutil.rmtree(work, ignore_errors=True)
    return result
