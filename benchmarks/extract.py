"""Extraction throughput against a bare forward pass on the same batches.

`ratio` (extraction prompts/s ÷ bare-forward prompts/s) is what hooks,
concept binning, the resumable chunk writes and the HDF5 store cost; the
target is ≥ 0.9, with the stage's default HDF5 filter (`extract.compression`);
`ratio_gzip` is the same with gzip, and `ratio_hooked` leaves the writes out.
All four are timed in one run, interleaved, best of `--repeats`, on random-weight Llamas over the
task prompts (all of them, or the first 128 of each task for the slow model), and on the real SmolLM2
of `model=smollm2` over the first 64 prompts of each of its tasks. Figures go to benchmarks/results/extract.json.

    python -m benchmarks.extract [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from transformers import LlamaConfig, LlamaForCausalLM

from geosteer.data.store import ChunkDir, write_store, write_task_group
from geosteer.data.tasks import concept_schema, load_task
from geosteer.models.lm import position_ids_for
from geosteer.models.task_lm import build_word_tokenizer
from geosteer.pipeline.common import CONFIG_DIR, load_lm
from geosteer.pipeline.extract import extract_rows

# name: (Llama size, prompts per task: None for all 5,909, fewer for the slow model)
SIZES = {
    "embedded (hidden 128, 3 blocks)": (
        dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4),
        None,
    ),
    "mid (hidden 1024, 8 blocks, vocab 32k)": (
        dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16, vocab_size=32000),
        128,
    ),
}
TASKS = ["weekdays", "months", "letters", "ages"]
BATCH, CHUNK = 64, 1024
SMOLLM2 = ("SmolLM2-135M (GGUF, hidden 576, 30 blocks, vocab 49k)", ["weekdays_next", "months_next", "letters_next"], 64)


@torch.inference_mode()
def bare_forward(model, tokenizer, texts: list[str]) -> None:
    for i in range(0, len(texts), BATCH):
        enc = tokenizer(texts[i : i + BATCH], padding=True, return_tensors="pt")
        model(
            input_ids=enc.input_ids,
            attention_mask=enc.attention_mask,
            position_ids=position_ids_for(enc.attention_mask),
            use_cache=False,
            logits_to_keep=1,
        )


def hooked_forward(model, tokenizer, prompts, schemas, layer: int) -> None:
    """The extraction forward alone: hook on block `layer`, softmax, concept bins, no writes."""
    for name, ps in prompts.items():
        extract_rows(model, tokenizer, [p.text for p in ps], layer, schemas[name].variant_ids, BATCH, "float32")


def extraction(model, tokenizer, prompts, schemas, tasks, layer: int, root: Path, compression: str) -> None:
    """What stage=extract does per task: hooked forward, chunk files, store assembly (HDF5 filter `compression`)."""
    chunks = ChunkDir(root / "chunks")
    for task in tasks:
        texts = [p.text for p in prompts[task.name]]
        for c in range(0, len(texts), CHUNK):
            rows = extract_rows(model, tokenizer, texts[c : c + CHUNK], layer, schemas[task.name].variant_ids, BATCH, "float32")
            chunks.write(task.name, c // CHUNK, rows, texts[c : c + CHUNK])

    def groups(f):
        for task in tasks:
            texts = [p.text for p in prompts[task.name]]
            rows = chunks.read_task(task.name, {c // CHUNK: texts[c : c + CHUNK] for c in range(0, len(texts), CHUNK)})
            write_task_group(f, schemas[task.name], task.to_dict(), prompts[task.name], rows, compression)

    write_store(root / "activations.h5", {}, groups)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def random_llamas():
    """(name, model, tokenizer, tasks, layer, prompts per task) of the random-weight Llamas, on the word tokenizer."""
    tasks = [load_task(t, CONFIG_DIR / "task") for t in TASKS]
    tokenizer = build_word_tokenizer(p.text + " " + p.answer for t in tasks for p in t.prompts())
    for name, (size, per_task) in SIZES.items():
        torch.manual_seed(0)
        config = LlamaConfig(**{"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, **size})
        yield name, LlamaForCausalLM(config).eval(), tokenizer, tasks, 1, per_task


def smollm2():
    """The real SmolLM2 of `model=smollm2`, at its layer, on its default tasks."""
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        cfg = compose("config", overrides=["model=smollm2"])
    model, tokenizer = load_lm(cfg.model)
    name, tasks, per_task = SMOLLM2
    yield name, model, tokenizer, [load_task(t, CONFIG_DIR / "task") for t in tasks], cfg.model.layer, per_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "extract.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with initialize_config_dir(str(CONFIG_DIR), version_base=None):
        compression = compose("config").extract.compression  # the stage's default filter

    results = []
    for name, model, tokenizer, tasks, layer, per_task in (*random_llamas(), *smollm2()):
        schemas = {t.name: concept_schema(t, tokenizer, name) for t in tasks}
        prompts = {t.name: t.prompts()[:per_task] for t in tasks}
        texts = [p.text for ps in prompts.values() for p in ps]
        bare, hooked, full, gzip = [], [], [], []
        with tempfile.TemporaryDirectory() as tmp:
            bare_forward(model, tokenizer, texts[:BATCH])  # warm-up
            for r in range(args.repeats):  # interleaved, so drifts in machine speed hit all three alike
                bare.append(timed(lambda: bare_forward(model, tokenizer, texts)))
                hooked.append(timed(lambda: hooked_forward(model, tokenizer, prompts, schemas, layer)))
                full.append(
                    timed(lambda: extraction(model, tokenizer, prompts, schemas, tasks, layer, Path(tmp) / str(r), compression))
                )
                gzip.append(
                    timed(lambda: extraction(model, tokenizer, prompts, schemas, tasks, layer, Path(tmp) / f"gz{r}", "gzip"))
                )
        row = {
            "model": name,
            "prompts": len(texts),
            "bare_forward_prompts_per_s": len(texts) / min(bare),
            "hooked_forward_prompts_per_s": len(texts) / min(hooked),
            "extraction_prompts_per_s": len(texts) / min(full),
            "ratio_hooked": min(bare) / min(hooked),
            "ratio": min(bare) / min(full),
            "ratio_gzip": min(bare) / min(gzip),  # the same with extract.compression=gzip
        }
        print(
            f"{name}: bare {row['bare_forward_prompts_per_s']:.0f} prompts/s; hooked + q "
            f"{row['hooked_forward_prompts_per_s']:.0f} (ratio {row['ratio_hooked']:.3f}); full extraction with "
            f"writes {row['extraction_prompts_per_s']:.0f} (ratio {row['ratio']:.3f})"
        )
        results.append(row)
    meta = {
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "batch_size": BATCH,
        "chunk_size": CHUNK,
        "compression": compression,
        "repeats": args.repeats,
        "target_ratio": 0.9,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
