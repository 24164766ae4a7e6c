"""`tail(h; carrier)` of docs/method.md §0: the network after block ℓ at a carrier prompt's last position.

Under causal attention the carrier's earlier positions do not depend on the
last position's `h`, so their keys and values are computed once per carrier
and kept. A call then runs a single token through blocks ℓ+1…L, the final
norm and the lm_head; blocks 0…ℓ are skipped for that token, block ℓ handing
on the given `h`. Its attention over the kept keys and values is our own
(`last_token_attention`): plain matmuls with the prefix as a constant operand,
so `vmap` batches its backward over Jacobian rows (SDPA's backward has no
batching rule and ran once per row) and the prefix is never copied per point.
Any Hugging Face decoder whose blocks sit in a ModuleList and whose attention
goes through `AttentionInterface` works; `use_cache=False` runs whole prompts
with a replacement hook instead (slower, for any causal LM).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import weakref
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn
from transformers import AttentionInterface

from geosteer.models import arguments
from geosteer.models.lm import capture_residual, decoder_layers, position_ids_for, replace_last_token


def _bins(variant_ids: Sequence[Sequence[int]], V: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded token index (K, M) of the concept bins, its validity mask, and the "other" tokens' mask (V,)."""
    return _bins_cached(tuple(map(tuple, variant_ids)), V, torch.device(device))


@functools.lru_cache(maxsize=64)
def _bins_cached(variant_ids: tuple[tuple[int, ...], ...], V: int, device: torch.device):
    with torch.inference_mode(False):  # normal tensors, usable by autograd whatever mode first built them
        width = max(len(v) for v in variant_ids)
        index = torch.tensor([list(v) + [v[0]] * (width - len(v)) for v in variant_ids], device=device)
        valid = torch.tensor([[j < len(v) for j in range(width)] for v in variant_ids], device=device)
        other = torch.ones(V, dtype=torch.bool, device=device)
        other[index.flatten()] = False
    return index, valid, other


def log_concept_probs(logits: torch.Tensor, variant_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """log q over K concept bins and "other", in log space so that √q has stable gradients. (N, V) → (N, K+1)

    Each bin is a log-sum-exp over its token variants; "other" is the log-sum-exp
    over every token in no bin (equal to `1 − Σ q_k` without its cancellation).
    """
    index, valid, other = _bins(variant_ids, logits.shape[-1], logits.device)
    norm = logits.logsumexp(-1, keepdim=True)  # (N, 1)
    concept = logits[:, index].masked_fill(~valid, float("-inf")).logsumexp(-1)  # (N, K)
    rest = logits.masked_fill(~other, float("-inf")).logsumexp(-1, keepdim=True)  # (N, 1)
    return torch.cat([concept, rest], -1) - norm


def sqrt_q_head_jacobian(logits: torch.Tensor, W: torch.Tensor, variant_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """∂√q/∂u in closed form for logits z = W u + b: ½ √q_k (w̄_k − w̄). (N, V), (V, d) → (N, K+1, d)

    w̄ = E_p[W_v] over the vocabulary and w̄_k = E[W_v] within bin k (its own
    softmax), so the lm_head never enters a reverse pass (the "head trick").
    """
    index, valid, other = _bins(variant_ids, logits.shape[-1], logits.device)
    s = (0.5 * log_concept_probs(logits, variant_ids)).exp()  # (N, K+1)
    w_all = logits.softmax(-1) @ W  # (N, d)
    within = logits[:, index].masked_fill(~valid, float("-inf")).softmax(-1)  # (N, K, M)
    w_concept = torch.einsum("nkm,kmd->nkd", within, W[index])
    w_other = logits.masked_fill(~other, float("-inf")).softmax(-1) @ W  # (N, d)
    w_bins = torch.cat([w_concept, w_other.unsqueeze(1)], 1)  # (N, K+1, d)
    return 0.5 * s.unsqueeze(-1) * (w_bins - w_all.unsqueeze(1))


class _Handoff(nn.Module):
    """Stands in for a skipped block: passes the stream on; block ℓ's stand-in emits the given `h`."""

    def __init__(self, h: torch.Tensor | None, as_tuple: bool):
        super().__init__()
        self.h, self.as_tuple = h, as_tuple

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        out = hidden_states if self.h is None else self.h.unsqueeze(1).to(hidden_states.dtype)  # (N, 1, d)
        return (out,) if self.as_tuple else out


@contextlib.contextmanager
def _skip_blocks(model: nn.Module, layer: int, h: torch.Tensor, as_tuple: bool) -> Iterator[None]:
    """Blocks 0…`layer` replaced by hand-offs for one forward; restored on exit, whatever happens."""
    layers = decoder_layers(model)
    saved = [layers[i] for i in range(layer + 1)]
    try:
        for i in range(layer + 1):
            layers[i] = _Handoff(h if i == layer else None, as_tuple)
        yield
    finally:
        for i, block in enumerate(saved):
            layers[i] = block


# Per decoder block: the prefix's keys and values (b, kv_heads, T-1, head_dim), b = 1 or N, and which
# prefix positions are real tokens (b, T-1). Set only while `last_token_hidden` runs.
_PREFIX: contextvars.ContextVar[list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = contextvars.ContextVar("prefix")
LAST_TOKEN_ATTENTION = "geosteer_last_token"


def last_token_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         attention_mask, scaling: float | None = None, dropout: float = 0.0, softcap=None,
                         sliding_window: int | None = None, **kwargs) -> tuple[torch.Tensor, None]:  # fmt: skip
    """One new token attending to the kept prefix of its block and to itself.

    query (N, H, 1, hd); key, value (N, H_kv, 1, hd): the new token's own. → (N, 1, H, hd)
    """
    if kwargs.get("s_aux") is not None or getattr(module, "sinks", None) is not None or dropout:
        raise NotImplementedError("the last-token tail has no attention sinks or attention dropout; use use_cache=False.")
    k_prefix, v_prefix, valid = _PREFIX.get()[module.layer_idx]
    N, H, _, hd = query.shape
    groups = H // key.shape[1]  # grouped-query attention: query heads per key head
    q = query.reshape(N, key.shape[1], groups, hd)  # (N, H_kv, G, hd)
    scale = hd**-0.5 if scaling is None else scaling
    shared = k_prefix.shape[0] == 1  # one prefix for every point: fold the points into the rows of one matmul
    if shared:  # (H_kv, N·G, hd) @ (H_kv, hd, T-1), with no copy of the prefix per point
        rows = q.transpose(0, 1).reshape(q.shape[1], N * groups, hd)
        prior = (rows @ k_prefix[0].transpose(-1, -2)).view(q.shape[1], N, groups, -1).transpose(0, 1)
    else:
        prior = q @ k_prefix.transpose(-1, -2)  # (N, H_kv, G, T-1)
    prior = prior * scale
    own = (q * key).sum(-1, keepdim=True) * scale  # (N, H_kv, G, 1)
    scores = torch.cat([prior, own], -1)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    keep = valid
    if sliding_window is not None:  # the last token sees the window's newest positions only
        T = valid.shape[-1] + 1
        keep = keep & (torch.arange(T - 1, device=valid.device) >= T - sliding_window)
    mask = torch.cat([keep, keep.new_ones(keep.shape[0], 1)], -1)[:, None, None, :]  # (b, 1, 1, T)
    p = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    weights = p[..., :-1]  # (N, H_kv, G, T-1)
    if shared:
        rows = weights.transpose(0, 1).reshape(q.shape[1], N * groups, -1)
        prior_out = (rows @ v_prefix[0]).view(q.shape[1], N, groups, hd).transpose(0, 1)
    else:
        prior_out = weights @ v_prefix
    out = prior_out + p[..., -1:] * value  # (N, H_kv, G, hd)
    return out.reshape(N, 1, H, hd), None


AttentionInterface.register(LAST_TOKEN_ATTENTION, last_token_attention)


_CONFIGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model → the configs its modules read


@contextlib.contextmanager
def _attention(model: nn.Module, name: str) -> Iterator[None]:
    """`model`'s attention implementation set to `name` for one forward; restored on exit, whatever happens."""
    if model not in _CONFIGS:  # found once per model: a walk over its modules costs about 1 ms on 30 blocks
        _CONFIGS[model] = list({id(c): c for c in (model.config, *(m.config for m in model.modules()
                                                                      if hasattr(m, "config")))}.values())  # fmt: skip
    configs = _CONFIGS[model]
    saved = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = name
        yield
    finally:
        for c, old in zip(configs, saved):
            c._attn_implementation = old


def last_token_hidden(model: nn.Module, layer: int, h: torch.Tensor,
                      prefix: Sequence[tuple[torch.Tensor, torch.Tensor]], valid: torch.Tensor,
                      input_ids: torch.Tensor, position_ids: torch.Tensor, as_tuple: bool,
                      logits: bool = False) -> torch.Tensor:  # fmt: skip
    """The final (normed) hidden state at the last position when block `layer` emits `h` there.

    Only the last token runs, through blocks `layer`+1…L, attending to `prefix`: per block, the
    earlier positions' keys and values, which under causal attention do not depend on `h`.
    Autograd flows through `h` and, when they carry gradients, through the prefix.
    h (N, d); prefix: per block (b, H_kv, T-1, hd) ×2 with b = 1 (shared) or N; valid (b, T-1) real
    (not padding) prefix positions; input_ids, position_ids (N, T) or (N, 1): the last is used → (N, d),
    or with `logits` the model's own last-position logits, soft cap or scale included → (N, V)
    """
    token = _PREFIX.set([(k, v, valid) for k, v in prefix])
    try:
        with _skip_blocks(model, layer, h, as_tuple), _attention(model, LAST_TOKEN_ATTENTION):
            out = (model if logits else model.get_decoder())(
                input_ids=input_ids[:, -1:], position_ids=position_ids[:, -1:], attention_mask=None, use_cache=False
            )
    finally:
        _PREFIX.reset(token)
    return out.logits[:, -1] if logits else out.last_hidden_state[:, -1]


class CarrierTail:
    """The tail of `model` after block `layer` for a fixed set of carrier prompts.

    Args:
        model: a causal LM (eval mode).
        layer: the steering block ℓ.
        input_ids, attention_mask: the carriers, left-padded. (C, T)
        use_cache: cache the carriers' earlier positions and run one token (fast);
            False runs each whole prompt with a replacement hook (the reference).
    """

    @torch.no_grad()
    def __init__(self, model, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor, use_cache: bool = True):
        from transformers import DynamicCache

        blocks = len(decoder_layers(model))
        arguments.index("CarrierTail", "layer", layer, blocks, "the model's {n} blocks", per_point=False)
        ids = input_ids
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2 or ids.dtype not in (torch.int64, torch.int32) or not ids.numel():
            got = f"a {ids.dtype} tensor of shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
            raise ValueError(
                f"CarrierTail: input_ids must be an int64 (or int32) tensor (C, T) of at least one carrier; got {got}."
            )
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != ids.shape:
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
            raise ValueError(f"CarrierTail: attention_mask must be a tensor of input_ids' shape {tuple(ids.shape)}; got {got}.")
        V = getattr(model.get_input_embeddings(), "num_embeddings", None)
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or (V is not None and high >= V):
            raise ValueError(f"CarrierTail: input_ids holds token id {low if low < 0 else high}, outside the model's "
                             f"vocabulary; token ids are integers in 0 … {V - 1}.")  # fmt: skip
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("CarrierTail needs left-padded carriers: set tokenizer.padding_side = 'left'.")
        self.model, self.layer, self.use_cache = model, layer, use_cache
        self.input_ids, self.attention_mask = input_ids, attention_mask
        self.position_ids = position_ids_for(attention_mask)
        with capture_residual(model, layer, torch.full((len(input_ids),), input_ids.shape[1] - 1)) as cap:
            out = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=self.position_ids,
                cache=DynamicCache() if use_cache else None,  # no config: sliding-window blocks keep every position
                use_cache=use_cache,
                logits_to_keep=1,
            )
        self.as_tuple = cap["as_tuple"]
        self.h = cap["h"]  # (C, d) the carriers' own h at block ℓ
        self.logits0 = out.logits[:, -1]  # (C, V) unsteered
        # Keys and values of every position but the last, per block. (C, heads, T-1, head_dim). A cache built
        # from the config would keep only sliding_window − 1 positions in a sliding block, the ones the *next*
        # token sees: one short for rerunning the last.
        self.kv = [(lay.keys[..., :-1, :], lay.values[..., :-1, :]) for lay in out.cache.layers] if use_cache else None
        self.kv_rows: torch.Tensor | None = None  # carrier → its row of `kv`, in a `select`ed tail

    @classmethod
    def of_prompts(cls, model, tokenizer, layer: int, prompts) -> CarrierTail:
        """The tail for carrier prompts given as text (the tokenizer pads on the left): a list (or array) of strings."""
        listed = not isinstance(prompts, (str, bytes)) and isinstance(prompts, Iterable)
        prompts = list(prompts) if listed else prompts
        if not listed or not prompts or not all(isinstance(p, str) for p in prompts):
            got = f"{len(prompts)} prompt(s)" if listed and not prompts else repr(prompts)[:80]
            raise ValueError(f"CarrierTail.of_prompts: prompts must be a non-empty list of strings, one carrier prompt "
                             f"each; got {got}.")  # fmt: skip
        arguments.index("CarrierTail.of_prompts", "layer", layer, len(decoder_layers(model)), "the model's {n} blocks",
                        per_point=False)  # fmt: skip
        enc = tokenizer(prompts, padding=True, return_tensors="pt").to(model.device)
        if empty := [i for i, row in enumerate(enc.attention_mask.tolist()) if not any(row)]:
            raise ValueError(f"CarrierTail.of_prompts: prompt {empty[0]} ({prompts[empty[0]]!r}) has no token; give "
                             f"each carrier prompt some text.")  # fmt: skip
        return cls(model, layer, enc.input_ids, enc.attention_mask)

    def __len__(self) -> int:
        return len(self.input_ids)

    def select(self, index: torch.Tensor) -> CarrierTail:
        """The tail whose carrier i is this one's carrier index[i], sharing the cached keys and values (no copy).

        Lets many (pair, carrier) rows, several on the same prompt, go through one batch. index (C',) → C' carriers
        """
        if not isinstance(index, torch.Tensor) or index.ndim != 1:
            raise ValueError(f"CarrierTail.select: index must be a 1-D integer tensor of carriers; got "
                             f"{type(index).__name__ if not isinstance(index, torch.Tensor) else tuple(index.shape)}.")  # fmt: skip
        arguments.index("CarrierTail.select", "index", index, len(self), "the tail's {n} carriers")
        tail = copy.copy(self)
        tail.input_ids, tail.attention_mask, tail.position_ids = (t[index] for t in (self.input_ids, self.attention_mask,
                                                                                     self.position_ids))  # fmt: skip
        tail.h, tail.logits0 = self.h[index], self.logits0[index]
        tail.kv_rows = index if self.kv_rows is None else self.kv_rows[index]
        return tail

    @property
    def head(self) -> nn.Module | None:
        """The lm_head, when logits are exactly `head(final hidden)` (no logit scaling or soft-capping)."""
        scaled = any(getattr(self.model.config, a, None) for a in ("final_logit_softcapping", "logit_scale"))
        return None if scaled else self.model.get_output_embeddings()

    def hidden(self, h: torch.Tensor, carrier: torch.Tensor) -> torch.Tensor:
        """The final (normed) hidden state at the last position, before the lm_head. (N, d), (N,) → (N, d)"""
        if not self.use_cache:
            with replace_last_token(self.model, self.layer, h):
                out = self.model.get_decoder()(
                    input_ids=self.input_ids[carrier],
                    attention_mask=self.attention_mask[carrier],
                    position_ids=self.position_ids[carrier],
                    use_cache=False,
                )
            return out.last_hidden_state[:, -1]
        return self._last_token(h, carrier, logits=False)

    def _last_token(self, h: torch.Tensor, carrier: torch.Tensor, logits: bool) -> torch.Tensor:
        rows = carrier if self.kv_rows is None else self.kv_rows[carrier]  # the rows of `kv`
        one = slice(0, 1) if bool((rows == rows[0]).all()) else slice(None)  # one prompt for every point: shared, not copied
        prefix = [(k[rows[one]], v[rows[one]]) for k, v in self.kv]
        return last_token_hidden(self.model, self.layer, h, prefix, self.attention_mask[carrier[one], :-1].bool(),
                                 self.input_ids[carrier], self.position_ids[carrier], self.as_tuple, logits)  # fmt: skip

    def logits(self, h: torch.Tensor, carrier: torch.Tensor) -> torch.Tensor:
        """Last-position logits when block ℓ's output there is `h`. h (N, d), carrier (N,) indices → (N, V)"""
        if self.head is not None:
            return self.head(self.hidden(h, carrier))
        if self.use_cache:  # soft-capped or scaled logits: the model's own head on the one token
            return self._last_token(h, carrier, logits=True)
        with replace_last_token(self.model, self.layer, h):
            out = self.model(
                input_ids=self.input_ids[carrier],
                attention_mask=self.attention_mask[carrier],
                position_ids=self.position_ids[carrier],
                use_cache=False,
                logits_to_keep=1,
            )
        return out.logits[:, -1]
