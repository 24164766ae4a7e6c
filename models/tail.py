"""`tail(h; carrier)` of SPEC §0: the network after block ℓ at a carrier prompt's last position.

Under causal attention the carrier's earlier positions do not depend on the
last position's `h`, so their keys and values are computed once per carrier
and cached. A call then runs a single token through blocks ℓ+1…L, the final
norm and the lm_head; blocks 0…ℓ are skipped for that token, block ℓ handing
on the given `h`. Any Hugging Face decoder whose blocks sit in a ModuleList
and which takes a `DynamicCache` works; `use_cache=False` runs whole prompts
with a replacement hook instead (slower, for any causal LM).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from models.lm import capture_residual, decoder_layers, position_ids_for, replace_last_token


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

        if not bool(attention_mask[:, -1].all()):
            raise ValueError("CarrierTail needs left-padded carriers: set tokenizer.padding_side = 'left'.")
        self.model, self.layer, self.use_cache = model, layer, use_cache
        self.input_ids, self.attention_mask = input_ids, attention_mask
        self.position_ids = position_ids_for(attention_mask)
        kinds = {}

        def record_kind(_module, _inputs, output) -> None:
            kinds["tuple"] = isinstance(output, tuple)

        hook = decoder_layers(model)[layer].register_forward_hook(record_kind)
        try:
            with capture_residual(model, layer, torch.full((len(input_ids),), input_ids.shape[1] - 1)) as cap:
                out = model(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=self.position_ids,
                    past_key_values=DynamicCache(config=model.config) if use_cache else None,
                    use_cache=use_cache,
                    logits_to_keep=1,
                )
        finally:
            hook.remove()
        self.as_tuple = kinds["tuple"]
        self.h = cap["h"]  # (C, d) the carriers' own h at block ℓ
        self.logits0 = out.logits[:, -1]  # (C, V) unsteered
        # Keys and values of every position but the last, per block. (C, heads, T-1, head_dim)
        self.kv = [(lay.keys[..., :-1, :], lay.values[..., :-1, :]) for lay in out.past_key_values.layers] if use_cache else None

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def head(self) -> nn.Module | None:
        """The lm_head, when logits are exactly `head(final hidden)` (no logit scaling or soft-capping)."""
        scaled = any(getattr(self.model.config, a, None) for a in ("final_logit_softcapping", "logit_scale"))
        return None if scaled else self.model.get_output_embeddings()

    def hidden(self, h: torch.Tensor, carrier: torch.Tensor) -> torch.Tensor:
        """The final (normed) hidden state at the last position, before the lm_head. (N, d), (N,) → (N, d)"""
        decoder = self.model.get_decoder()
        if not self.use_cache:
            with replace_last_token(self.model, self.layer, h):
                out = decoder(
                    input_ids=self.input_ids[carrier],
                    attention_mask=self.attention_mask[carrier],
                    position_ids=self.position_ids[carrier],
                    use_cache=False,
                )
            return out.last_hidden_state[:, -1]
        with _skip_blocks(self.model, self.layer, h, self.as_tuple):
            out = decoder(
                input_ids=self.input_ids[carrier, -1:],
                attention_mask=self.attention_mask[carrier],
                position_ids=self.position_ids[carrier, -1:],
                past_key_values=self._cache(carrier),
                use_cache=True,
            )
        return out.last_hidden_state[:, -1]

    def _cache(self, carrier: torch.Tensor):
        """The carriers' cached keys and values for rows `carrier`, as views where possible (no copies).

        Only the tail blocks read them, and each of those copies its own once, when it appends the new token.
        """
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        one = bool((carrier == carrier[0]).all())
        for layer, (k, v) in zip(cache.layers, self.kv):
            k, v = (t[carrier[:1]].expand(len(carrier), -1, -1, -1) if one else t[carrier] for t in (k, v))
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v
        return cache

    def logits(self, h: torch.Tensor, carrier: torch.Tensor) -> torch.Tensor:
        """Last-position logits when block ℓ's output there is `h`. h (N, d), carrier (N,) indices → (N, V)"""
        if self.head is not None:
            return self.head(self.hidden(h, carrier))
        with replace_last_token(self.model, self.layer, h):
            out = self.model(
                input_ids=self.input_ids[carrier],
                attention_mask=self.attention_mask[carrier],
                position_ids=self.position_ids[carrier],
                use_cache=False,
                logits_to_keep=1,
            )
        return out.logits[:, -1]
