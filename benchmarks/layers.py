"""Which block to steer, and which tasks a pretrained LM can do: accuracy and centroid-swap rate per layer.

For each task it reports the LM's answer accuracy (arg-max concept against the
task's answer) and, at every candidate block, the centroid-swap rate: how often
replacing the last token's `h` by a class centroid makes that class the arg-max
(classes from the LM's own arg-max, as `stage=extract` makes them). docs/method.md §0 steers
at a late block where the answer is formed; the model config's `layer` is the
best of this sweep. A task whose values are not single tokens for this tokenizer
is reported as such. One forward pass per batch captures every candidate block.
Figures go to benchmarks/results/layers-<model>.json.

    python -m benchmarks.layers --model smollm2 --layers 18 21 24 27 29
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from geosteer.data.tasks import TaskError, concept_schema, load_task
from geosteer.models.lm import capture_residual, last_token_positions, read_last_token
from geosteer.pipeline.common import CONFIG_DIR, load_lm
from geosteer.pipeline.extract import centroid_swap_rate, row_classes

TASKS = ["weekdays", "months", "letters", "ages", "weekdays_next", "months_next", "letters_next"]


@torch.inference_mode()
def rows_at(model, tokenizer, texts: list[str], layers: list[int], variant_ids, batch_size: int = 64):
    """`q` and `h` at every layer of `layers` for `texts`: {"q": (N, K+1), layer: (N, d)}."""
    parts = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], padding=True, return_tensors="pt")
        positions = last_token_positions(enc.attention_mask)
        with contextlib.ExitStack() as stack:
            caps = [stack.enter_context(capture_residual(model, layer, positions)) for layer in layers]
            out = read_last_token(model, enc.input_ids, enc.attention_mask, layers[0], variant_ids)
        parts.append({"q": out.q, **{layer: cap["h"].float() for layer, cap in zip(layers, caps)}})
    return {k: torch.cat([p[k] for p in parts]).numpy() for k in parts[0]}


def sweep(model_name: str, layers: list[int], tasks: list[str], carriers: int, min_class_rows: int) -> dict:
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = compose("config", overrides=[f"model={model_name}"])
    start = time.perf_counter()
    model, tokenizer = load_lm(cfg.model)
    c = model.config
    out = {"model": model_name, "layers": layers, "load_s": round(time.perf_counter() - start, 1),
           "blocks": c.num_hidden_layers, "hidden": c.hidden_size, "vocab": c.vocab_size, "tasks": {}}  # fmt: skip
    for name in tasks:
        task = load_task(name, CONFIG_DIR / "task")
        try:
            schema = concept_schema(task, tokenizer, cfg.model.pretrained)
        except TaskError as e:
            out["tasks"][name] = {"error": str(e)}
            print(f"{name}: {e}")
            continue
        prompts = task.prompts()
        rows = rows_at(model, tokenizer, [p.text for p in prompts], layers, schema.variant_ids)
        answers = np.array([p.label for p in prompts])
        labels, left_out = row_classes(rows["q"], answers, "argmax", min_class_rows)
        swap = {
            layer: centroid_swap_rate(
                model, tokenizer, task, {"h": rows[layer]}, labels, layer, schema.variant_ids, n_carriers=carriers
            )  # fmt: skip
            for layer in layers
        }
        out["tasks"][name] = {
            "n": len(prompts),
            "K": schema.K,
            "accuracy": float((rows["q"][:, :-1].argmax(1) == answers).mean()),
            "mean_other_mass": float(rows["q"][:, -1].mean()),
            "classes": int(len(np.unique(labels[labels >= 0]))),
            "left_out": {task.concepts[k]: n for k, n in left_out.items()},
            "swap_rate": {str(k): v for k, v in swap.items()},
        }
        print(f"{name}: accuracy {out['tasks'][name]['accuracy']:.3f}, swap " +
              ", ".join(f"ℓ{k} {v:.2f}" for k, v in swap.items()), flush=True)  # fmt: skip
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--layers", type=int, nargs="+", default=[18, 21, 24, 27, 29])
    parser.add_argument("--tasks", nargs="+", default=TASKS)
    parser.add_argument("--carriers", type=int, default=16)
    parser.add_argument("--min-class-rows", type=int, default=10)
    args = parser.parse_args()
    result = sweep(args.model, args.layers, args.tasks, args.carriers, args.min_class_rows)
    path = Path(__file__).parent / "results" / f"layers-{args.model}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
