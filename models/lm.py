"""Causal-LM access: loading, decoder-block lookup, scoped residual hooks, concept bins.

Any Hugging Face causal LM goes through `load_causal_lm`; the embedded task LM
is saved with `save_pretrained` and comes back through the same call.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import pickle
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential", "cpu", "cuda")  # Accelerate's, and one device


def device_map_fault(v) -> str | None:
    """Why `v` is no device map transformers takes ("must be ..."); None when it is one."""
    if v is None or isinstance(v, dict) or v in DEVICE_MAPS or (isinstance(v, str) and re.fullmatch(r"cuda:\d+", v)):
        return None
    return f"must be null (one device), one of {list(DEVICE_MAPS)}, cuda:<index> or a dict of module → device"


# The fix for a damaged local model folder (the embedded LM is remade by its stage).
REMAKE = ("If it is the embedded task LM, train it again with `pipeline stage=lm overwrite=true`; otherwise copy or "
          "download the model folder again.")  # fmt: skip


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded, with the reason and the fix in the message."""


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ModelLoadError(f"dtype '{name}' is not supported; use one of {sorted(DTYPES)}.")
    return DTYPES[name]


def load_causal_lm(
    pretrained: str,
    dtype: str = "float32",
    revision: str | None = None,
    trust_remote_code: bool = False,
    device_map: str | None = None,
    gguf_file: str | None = None,
):
    """Load a causal LM and its tokenizer (left padding) from a local folder or the Hub.

    With `gguf_file`, `pretrained` is the folder holding that GGUF file, which transformers
    dequantises to `dtype` (it needs the `gguf` and `accelerate` packages).

    Raises:
        ModelLoadError: the folder is missing, the model is not cached and the Hub
            cannot be reached, or the checkpoint is not a causal LM.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if isinstance(pretrained, os.PathLike):
        pretrained = os.fspath(pretrained)
    if not isinstance(pretrained, str) or not pretrained:
        raise TypeError(f"pretrained={pretrained!r} must be a model folder or a Hub model id (a str or a path).")
    if isinstance(dtype, torch.dtype):  # torch.float32 as well as "float32"
        dtype = next((name for name, t in DTYPES.items() if t == dtype), str(dtype))
    if dtype not in DTYPES:
        raise TypeError(f"dtype={dtype!r} must be one of {list(DTYPES)} (or the torch dtype of one).")
    if not isinstance(trust_remote_code, bool):
        raise TypeError(f"trust_remote_code={trust_remote_code!r} must be True or False (False unless you trust the "
                        f"model's own code).")  # fmt: skip
    if revision is not None and not isinstance(revision, str):
        raise TypeError(f"revision={revision!r} must be a branch, tag or commit id (a str), or None.")
    if fault := device_map_fault(device_map):
        raise TypeError(f"device_map={device_map!r} {fault}.")
    looks_local = pretrained.startswith((".", "/", "~")) or Path(pretrained).exists()
    if looks_local and not Path(pretrained).expanduser().is_dir():
        raise ModelLoadError(
            f"model path '{pretrained}' does not exist. For the embedded task LM run `pipeline stage=lm` first "
            f"(or `stage=all`); otherwise point model.pretrained at a folder made by save_pretrained."
        )
    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        config = AutoConfig.from_pretrained(pretrained, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"could not load the config of '{pretrained}': {e.__class__.__name__}: {str(e).splitlines()[0]}. {REMAKE}\n"
            f"If it is a Hub model, download it where the Hub is reachable (`hf download {pretrained}`) and run "
            f"with HF_HUB_OFFLINE=1, or set model.pretrained to a local folder."
        ) from e
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            pretrained,
            config=config,
            dtype=resolve_dtype(dtype),
            device_map=device_map,
            output_loading_info=True,
            **kwargs,
        )
    except ValueError as e:
        raise ModelLoadError(
            f"'{pretrained}' (model_type '{config.model_type}') is not a causal LM: {str(e).splitlines()[0]}\n"
            f"Pick a checkpoint with a causal-LM head (AutoModelForCausalLM)."
        ) from e
    except pickle.UnpicklingError:
        raise ModelLoadError(
            f"the weights of '{pretrained}' are a pickle that holds more than tensors, and geosteer never unpickles "
            f"code. Load only checkpoints you trust, converted to safetensors (model.save_pretrained(folder) where they "
            f"were made)."
        ) from None
    except (OSError, RuntimeError, SafetensorError) as e:  # missing, or torn (safetensors' own error)
        raise ModelLoadError(
            f"could not load the weights of '{pretrained}': {type(e).__name__}: {' '.join(str(e).split())[:200]}. "
            f"{REMAKE}\n"
            f"Download them first (`hf download {pretrained}`) or point model.pretrained at a local folder."
        ) from e
    if missing := sorted(info.get("missing_keys") or ()):
        raise ModelLoadError(
            f"the weights of '{pretrained}' do not cover its config: {len(missing)} tensors are missing (e.g. "
            f"{missing[:3]}), and transformers would fill them at random. Make config.json match the weights (e.g. its "
            f"num_hidden_layers), or save the model again with save_pretrained."
        )
    if unused := sorted(k for k in info.get("unexpected_keys") or () if re.search(r"\blayers?\.\d+\.", k)):
        raise ModelLoadError(
            f"the weights of '{pretrained}' hold blocks its config leaves out: {len(unused)} tensors of decoder blocks "
            f"go unused (e.g. {unused[:3]}), so the model that runs is not the one that was saved. Make config.json "
            f"match the weights (e.g. its num_hidden_layers), or save the model again with save_pretrained."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(pretrained, **kwargs)
    except (OSError, ValueError, TypeError) as e:  # a missing or torn tokenizer.json raises any of these
        raise ModelLoadError(
            f"could not load the tokenizer of '{pretrained}' ({type(e).__name__}: {' '.join(str(e).split())[:200]}). {REMAKE}"
        ) from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM, found through its decoder rather than a fixed path."""
    candidates = []
    if hasattr(model, "get_decoder"):
        with contextlib.suppress(Exception):
            candidates.append(model.get_decoder())
    candidates += [getattr(model, a, None) for a in ("model", "transformer", "gpt_neox")]
    for c in candidates:
        for attr in ("layers", "h", "blocks"):
            layers = getattr(c, attr, None)
            if isinstance(layers, nn.ModuleList):
                return layers
        inner = getattr(c, "decoder", None)  # encoder-decoder style wrappers (OPT)
        if inner is not None and isinstance(getattr(inner, "layers", None), nn.ModuleList):
            return inner.layers
    raise ModelLoadError(f"cannot find the decoder blocks of {type(model).__name__}; it is not a supported causal LM.")


def lm_shape(model: nn.Module) -> dict[str, int]:
    """What a geometry trained on this LM's residual stream depends on: its width, depth and vocabulary."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return {"model_type": str(config.model_type), "hidden_size": int(config.hidden_size),
            "num_layers": len(decoder_layers(model)), "vocab_size": int(model.get_output_embeddings().weight.shape[0])}  # fmt: skip


SKETCH_DIM = 64  # numbers in a weight sketch
SKETCH_TOLERANCE = 0.05  # relative distance of two sketches of one model: float32 against bfloat16 weights give ~0.003


@torch.no_grad()
def weight_sketch(model: nn.Module, per_tensor: int = 8) -> list[float] | None:
    """A cheap content check of an LM's weights that holds across the dtype they are loaded in.

    `per_tensor` evenly spaced entries of every parameter (in name order), each tensor's scaled to unit length, then
    one fixed Gaussian projection to SKETCH_DIM numbers. Another model, or one of its tensors replaced, moves the
    sketch by ~√(2/tensors) of its length or more; a model loaded in another dtype by its rounding (< 1%). A light
    fine-tune that moves every weight by well under 5% may pass unseen. None when it cannot be taken: weights
    offloaded by a device_map (not in memory) or quantised to integers (bitsandbytes).
    """
    parts = []
    for _, p in sorted(model.named_parameters(), key=lambda item: item[0]):  # tied weights come once
        if p.device.type == "meta" or not p.is_floating_point():
            return None
        flat = p.detach().reshape(-1)
        at = torch.linspace(0, len(flat) - 1, min(per_tensor, len(flat)), dtype=torch.float64).round().long()
        picks = flat[at.to(flat.device)]
        v = picks.double().cpu()
        parts.append(v / v.norm().clamp_min(1e-30))
    v = torch.cat(parts) if parts else torch.zeros(1, dtype=torch.float64)
    projection = torch.randn(SKETCH_DIM, len(v), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return (projection @ v / SKETCH_DIM**0.5).tolist()


def sketch_distance(a: Sequence[float] | None, b: Sequence[float]) -> float:
    """‖a − b‖ / ‖b‖ of two weight sketches (inf when they are not both sketches; 0 when `a` could not be taken)."""
    if a is None:
        return 0.0
    try:
        x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        return math.inf
    if x.shape != (SKETCH_DIM,) or y.shape != (SKETCH_DIM,) or not (x.isfinite().all() and y.isfinite().all()):
        return math.inf
    return float((x - y).norm() / y.norm().clamp_min(1e-30))


def check_layer(model: nn.Module, layer: int) -> int:
    n = len(decoder_layers(model))
    if not 0 <= layer < n:
        raise ModelLoadError(
            f"layer {layer} is out of range: the model has {n} decoder blocks (0 ... {n - 1}). "
            f"Set model.layer to a block index; docs/method.md §0 suggests a late block such as {max(n - 2, 0)}."
        )
    return layer


def _hidden(output: torch.Tensor | tuple) -> torch.Tensor:
    """Decoder blocks return a tensor (transformers >= 4.57) or a tuple whose first item is it."""
    return output if isinstance(output, torch.Tensor) else output[0]


@contextlib.contextmanager
def capture_residual(model: nn.Module, layer: int, positions: torch.Tensor) -> Iterator[dict[str, torch.Tensor]]:
    """Record the residual stream leaving block `layer` at one position per row.

    Yields a dict whose key "h" holds the (B, d) captured rows after the forward, and "as_tuple"
    whether the block returns a tuple. The hook is removed on exit, whatever happens inside.
    """
    captured: dict = {}

    def hook(_module, _inputs, output):
        hidden = _hidden(output)  # (B, T, d)
        captured["as_tuple"] = isinstance(output, tuple)
        captured["h"] = hidden[torch.arange(hidden.shape[0], device=hidden.device), positions.to(hidden.device)]

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


@contextlib.contextmanager
def replace_last_token(model: nn.Module, layer: int, h: torch.Tensor) -> Iterator[None]:
    """Replace the residual stream leaving block `layer` at the last position by `h` (B, d).

    For left-padded batches the last position is every row's last prompt token.
    The hook is removed on exit, whatever happens inside.
    """

    def hook(_module, _inputs, output):
        hidden = _hidden(output).clone()  # (B, T, d)
        hidden[:, -1] = h.to(hidden.dtype)
        return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def last_token_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-pad token per row, for left, right or no padding. (B, T) -> (B,)"""
    T = attention_mask.shape[1]
    return T - 1 - attention_mask.flip(1).long().argmax(1)


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding, so a padded prompt sees the same positions as alone."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


@functools.lru_cache(maxsize=64)
def _bin_index(variant_ids: tuple[tuple[int, ...], ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat token ids and the concept bin of each, built once per schema (as normal tensors, usable by autograd)."""
    with torch.inference_mode(False):
        ids = torch.tensor([i for ids in variant_ids for i in ids])
        bins = torch.tensor([k for k, ids in enumerate(variant_ids) for _ in ids])
    return ids, bins


def concept_probs(probs: torch.Tensor, variant_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """Sum a full-vocabulary distribution into K concept bins plus "other". (B, V) -> (B, K+1)"""
    ids, bins = (t.to(probs.device) for t in _bin_index(tuple(map(tuple, variant_ids))))
    q = torch.zeros(probs.shape[0], len(variant_ids) + 1, dtype=probs.dtype, device=probs.device)
    q[:, :-1].index_add_(1, bins, probs[:, ids])
    q[:, -1] = (1 - q[:, :-1].sum(1)).clamp(min=0)
    return q


@dataclass
class LastTokenReadout:
    h: torch.Tensor  # (B, d) residual stream after block ℓ at the last prompt token
    q: torch.Tensor  # (B, K+1) concept bins plus "other"
    top1: torch.Tensor  # (B,) arg-max token id over the full vocabulary


@torch.inference_mode()
def read_last_token(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    layer: int,
    variant_ids: Sequence[Sequence[int]],
) -> LastTokenReadout:
    """One forward pass: `h` at block `layer` and `q` at the last token, for left-padded prompts."""
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("read_last_token needs left padding: set tokenizer.padding_side = 'left'.")
    positions = last_token_positions(attention_mask)
    with capture_residual(model, layer, positions) as cap:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_for(attention_mask),
            use_cache=False,
            logits_to_keep=1,
        )
    probs = out.logits[:, -1].float().softmax(-1)  # (B, V)
    return LastTokenReadout(cap["h"].float(), concept_probs(probs, variant_ids), probs.argmax(-1))
