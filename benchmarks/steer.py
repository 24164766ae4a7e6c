"""Steering generation with the shipped geometries of an evaluated run: how often it works, and what it costs.

For every task, family and pair (a, b) the evaluation scored, the carriers it used (class a's
seeded rows) are steered toward b with `Steering` at α = 1, and the model generates one token
greedily: a hit when that token is one of b's tokens. Beside each rate stands what `stage=eval`
reports for the same pairs and carriers: top-1@end of the path methods (whose paths end on c_b,
as the steered point does at α = 1) and, for INNSteer and CAA, which steer each carrier from its
own h, their own-point top-1 at α = 1 (eval knows each carrier's class; steering is measured both
without it, from the flow's or the nearest centroid's class, and told it). The overhead is the throughput of a plain forward pass over
that of a steered one, on one batch of prompts (≥ 0.9 is the target of the closed-form families), on the
embedded LM and on SmolLM2-135M (30 blocks, d = 576). The embedded LM is so small (3 blocks, d = 128)
that an 8-block flow costs about as much as its forward pass; on SmolLM2 each shipped architecture is
rebuilt at its width with untrained weights (what a pass costs does not depend on them).

    python -m benchmarks.steer [run folder] [--out FILE]  # default outputs/default; figures to results/steer.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from geosteer.data.store import ActivationStore
from geosteer.models.hub import ShippedGeometry, load_geometry, read_config
from geosteer.models.lm import lm_shape, load_causal_lm
from geosteer.models.steer import Steering
from geosteer.models.steering import carrier_rows
from geosteer.pipeline.common import load_lm

RESULTS = Path(__file__).parent / "results"
FAMILIES = {"linear": ("gaga_out", "linear"), "gaga_out": ("gaga_out", "geometry"), "gaga_jac": ("gaga_jac", "geometry"),
            "gaga_phate": ("gaga_phate", "geometry"), "bridge": ("bridge", "geometry"),
            "innsteer": ("innsteer", "geometry"), "caa": ("gaga_out", "caa")}  # method: (export, Steering method)  # fmt: skip


def hit_rate(lm, tokenizer, geometry, method: str, prompts: list[str], target: str, variant_ids,
             source: str | None = None) -> float:  # fmt: skip
    """The share of `prompts` whose first greedy token under steering toward `target` is one of its tokens."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    with Steering(lm, geometry, target, 1.0, method, source=source), torch.no_grad():
        out = lm.generate(**enc, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return float(np.isin(out[:, -1].numpy(), variant_ids).mean())


def eval_rate(task: dict, method: str, p: int) -> float | None:
    """What stage=eval reports for pair p: top-1@end (path methods) or own-point top-1 at α = 1 (INNSteer, CAA)."""
    if method in ("innsteer", "caa"):
        own, pair = task["own_point"].get("methods", {}).get(method), task["pairs"][p]
        pairs = task["own_point"].get("pairs", task["pairs"])  # own h leaves out pairs INNSteer has no means for
        if own is None or pair not in pairs:
            return None
        i, q = task["own_point"]["alphas"].index(1.0), pairs.index(pair)
        return own["top1"][q][i] / own["carriers"][q]
    scores = task["methods"].get(method, {}).get("per_pair", {}).get("top1_at_end")
    return None if scores is None else scores[p]


def overhead(lm, tokenizer, geometry, method: str, prompts: list[str], target: str, repeats: int = 5) -> float:
    """Throughput of a steered forward pass relative to a plain one (best of `repeats` each; 1.0: free)."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True)

    def best(context) -> float:
        times = []
        for _ in range(repeats):
            with context(), torch.no_grad():
                start = time.perf_counter()
                lm(**enc)
                times.append(time.perf_counter() - start)
        return min(times)

    plain = best(lambda: torch.no_grad())
    steered = best(lambda: Steering(lm, geometry, target, 1.0, method))
    return plain / steered


def pretrained_overhead(run: Path, task: str, prompts: list[str]) -> dict[str, float]:
    """`overhead` on SmolLM2-135M at its config's layer, for the closed-form methods, each export of `run` rebuilt
    at SmolLM2's width with the same settings (untrained), with concept centroids drawn at random."""
    model = OmegaConf.load(Path(__file__).parents[1] / "configs" / "model" / "smollm2.yaml").model
    lm, tokenizer = load_lm(model)
    shape = lm_shape(lm)
    d = shape["hidden_size"]
    values = read_config(run / "geometry" / task / "gaga_out")["meta"]["concepts"]["values"]
    concepts = {"values": values, "variant_ids": [tokenizer(" " + v, add_special_tokens=False).input_ids[:1] for v in values],
                "centroids": torch.randn(len(values), d, generator=torch.Generator().manual_seed(0)).tolist()}  # fmt: skip
    out = {}
    for method, (export, how) in FAMILIES.items():
        config = read_config(run / "geometry" / task / export)
        family = config["meta"]["family"]
        if how == "geometry" and family == "gaga":  # an L-BFGS solve per prompt, not a closed form
            continue
        ctor = {k: v for k, v in config.items() if k != "meta"} | {"input_dim": d}
        meta = {"family": family, "layer": int(model.layer), "lm_shape": shape, "concepts": concepts}
        geometry = ShippedGeometry.families[family](**ctor, meta=meta).eval().requires_grad_(False)
        out[method] = overhead(lm, tokenizer, geometry, how, prompts, values[0])
        print(f"overhead on SmolLM2-135M {method}: {out[method]:.2f}× a plain forward's throughput", flush=True)
    return out


def main(run: Path, path: Path) -> None:
    evaluated = json.loads((run / "eval" / "results.json").read_text())
    config = json.loads((run / "eval" / "stage.json").read_text())
    lm, tokenizer = load_causal_lm(str(run / "lm"), "float32")
    out: dict = {"run": run.name, "tasks": {}, "overhead": {}}
    with ActivationStore(run / "extract" / "activations.h5") as store:
        seed = json.loads(store.attrs["config"])["seed"]  # eval's carriers are seeded rows of each source class
        for name, task in evaluated["tasks"].items():
            rows = store.read(name, ["label", "prompt"])
            schema = store.schema(name)
            carriers = task["carriers"]
            rates = {}
            for method, (export, how) in FAMILIES.items():
                folder = run / "geometry" / name / export
                if not (folder / "config.json").is_file():
                    continue
                geometry = load_geometry(folder)
                n = carriers if method not in ("innsteer", "caa") else 64
                ours, told, theirs = [], [], []
                for p, (a, b) in enumerate(task["pairs"]):
                    if how == "geometry" and not getattr(geometry, "learned", lambda *_: True)(a, b):  # INNSteer
                        continue
                    prompts = list(rows["prompt"][carrier_rows(rows["label"], a, n, seed)])
                    args = (lm, tokenizer, geometry, how, prompts, schema.values[b], schema.variant_ids[b])
                    ours.append(hit_rate(*args))
                    told.append(hit_rate(*args, source=schema.values[a]) if method in ("innsteer", "caa") else ours[-1])
                    theirs.append(eval_rate(task, method, p))
                reported = [t for t in theirs if t is not None]
                rates[method] = {"generation_top1": float(np.mean(ours)), "with_source_top1": float(np.mean(told)),
                                 "eval_top1": float(np.mean(reported)) if reported else None}  # fmt: skip
                print(f"{name}/{method}: generation {rates[method]['generation_top1']:.4f} (told the source class "
                      f"{rates[method]['with_source_top1']:.4f}), eval {rates[method]['eval_top1']}", flush=True)  # fmt: skip
            out["tasks"][name] = rates
        first = next(iter(evaluated["tasks"]))
        prompts = list(store.read(first, ["prompt"])["prompt"][:64])
        values = store.schema(first).values
    for method, (export, how) in FAMILIES.items():
        folder = run / "geometry" / first / export
        if (folder / "config.json").is_file():
            geometry = load_geometry(folder)
            learned = getattr(geometry, "known_classes", range(len(values))) if how == "geometry" else range(len(values))
            if not learned:  # INNSteer: a flow that learned no class's mean steers nowhere
                continue
            out["overhead"][method] = overhead(lm, tokenizer, geometry, how, prompts, values[learned[0]])
            print(f"overhead {method}: {out['overhead'][method]:.2f}× a plain forward's throughput", flush=True)
    out["overhead_smollm2"] = pretrained_overhead(run, first, prompts)
    out["eval_fingerprint"] = config.get("fingerprint")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, nargs="?", default=Path("outputs/default"), help="an evaluated run folder")
    parser.add_argument("--out", type=Path, default=RESULTS / "steer.json",
                        help="where the figures go (default: the ones docs/benchmarks.md cites)")  # fmt: skip
    args = parser.parse_args()
    main(args.run, args.out)
