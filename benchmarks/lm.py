"""Embedded-LM training step: the interchange loss by a whole second forward against the cached prefix.

The interchange loss asks for the donor's answer when block ℓ's last-token
residual is swapped. The slow form runs every prompt through the model a
second time with the swap hooked in; the fast form (`pipeline.lm`) reruns only
the last token through the blocks after ℓ, on the keys and values the first
forward computed. Both take forward, backward and an AdamW step on the same
batches of the default embedded LM (hidden 128, 3 blocks, ℓ = 1, batch 128),
interleaved, best of `--repeats`. Also max |Δloss| between the two.

Figures go to benchmarks/results/lm.json.

    python -m benchmarks.lm [--steps 20] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from geosteer.data.tasks import load_task
from geosteer.models.lm import capture_residual, position_ids_for, replace_last_token
from geosteer.models.task_lm import build_task_lm, build_word_tokenizer
from geosteer.pipeline.common import CONFIG_DIR
from geosteer.pipeline.lm import answer_logits, encode_prompts

RESULTS = Path(__file__).parent / "results" / "lm.json"
LAYER, BATCH = 1, 128


def interchange_loss(model, ids, mask, soft, donor, cached: bool) -> torch.Tensor:
    """Next-token loss plus the interchange loss, the swapped forward either cached (`pipeline.lm`) or whole."""
    if cached:
        logits, swapped = answer_logits(model, LAYER, ids, mask, donor)
        return F.cross_entropy(logits, soft) + F.cross_entropy(swapped, soft[donor])
    pos = position_ids_for(mask)
    with capture_residual(model, LAYER, torch.full((len(ids),), ids.shape[1] - 1)) as cap:
        logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=1).logits
    with replace_last_token(model, LAYER, cap["h"][donor]):
        swapped = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                        logits_to_keep=1).logits[:, -1]  # fmt: skip
    return F.cross_entropy(logits[:, -1], soft) + F.cross_entropy(swapped, soft[donor])


def run_steps(model, opt, batches, cached: bool) -> tuple[float, list[float]]:
    losses, start = [], time.perf_counter()
    for ids, mask, soft, donor in batches:
        loss = interchange_loss(model, ids, mask, soft, donor, cached)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    return time.perf_counter() - start, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tasks = [load_task(t, CONFIG_DIR / "task") for t in ("weekdays", "months", "letters", "ages")]
    prompts = [(t, p) for t in tasks for p in t.prompts()]
    tokenizer = build_word_tokenizer(p.text + " " + p.answer for _, p in prompts)
    data = encode_prompts(tokenizer, prompts, smoothing=0.4)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(args.steps):
        rows = torch.randint(len(data), (BATCH,), generator=g)
        ids, mask, _, soft = (t[rows] for t in data.tensors)
        keep = mask.any(0)
        batches.append((ids[:, keep], mask[:, keep], soft, torch.randperm(BATCH, generator=g)))
    best = {True: float("inf"), False: float("inf")}
    losses = {}
    for _ in range(args.repeats):
        for cached in (False, True):  # interleaved, from the same initial weights
            torch.manual_seed(0)
            model = build_task_lm(tokenizer, hidden_size=128, num_layers=3, num_heads=4, intermediate_size=256)
            opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
            seconds, losses[cached] = run_steps(model, opt, batches, cached)
            best[cached] = min(best[cached], seconds)
    ms = {k: 1e3 * v / args.steps for k, v in best.items()}
    gap = max(abs(a - b) for a, b in zip(losses[True], losses[False]))
    result = {"whole_second_forward_ms_per_step": ms[False], "cached_prefix_ms_per_step": ms[True],
              "ratio": ms[False] / ms[True], "max_loss_gap": gap}  # fmt: skip
    print(json.dumps(result))
    meta = {"torch": torch.__version__, "threads": args.threads, "machine": platform.machine(), "steps": args.steps,
            "batch": BATCH, "repeats": args.repeats}  # fmt: skip
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"meta": meta, "step": result}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
