"""Attention over the segments of one packed row, without padding and without masked work.

A batch packed into one row [1, T] (:func:`ulma.logprobs.pack_segments`) is a run of
*blocks*.  Block ``(start, end, prefix_start, prefix_end)``: the queries at positions
``[start, end)`` attend to every key of ``[prefix_start, prefix_end)`` (a shared prompt) and
causally to the keys of ``[start, end)`` (themselves): causal attention aligned at the
bottom right, query j of the block seeing the whole prefix and keys start..start+j.  An
empty prefix is plain causal attention.  The blocks tile ``[0, T)`` in order, so the
output is their outputs side by side.

Why: a row of a prompt and its k responses ([prompt, r_1, ..., r_k]) under one [W, W] mask
makes the attention kernel compute every query against every key and throw away the masked
scores, the upper triangle and the responses' scores against each other (on a CPU its
flash kernel skips nothing under a custom mask: two thirds of a pair's scores), and rows
padded to the batch's width run padding through every layer.  One scaled-dot-product call
per block does only the scores that count.  It runs in forward passes without gradients on
a CPU, where kernels are bound by arithmetic (:func:`ulma.logprobs.use_segments` says where
and what was measured); elsewhere the masked path stays.

The model runs it as its attention implementation ``ulma_sdpa``
(:func:`install`), which is Hugging Face's ``sdpa`` unchanged for every call without a
``segments`` keyword (generation, a padded batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

NAME = "ulma_sdpa"


@dataclass(frozen=True)
class Segments:
    """The blocks of a packed row: ``(start, end, prefix_start, prefix_end)`` each, in order,
    tiling [0, T) (see the module's docstring).  Plain Python integers: the row's layout is
    decided on the host, and the attention slices with them without reading the device."""

    blocks: tuple[tuple[int, int, int, int], ...]

    @property
    def width(self) -> int:
        return self.blocks[-1][1] if self.blocks else 0


def segment_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, segments: Segments | None = None, **kwargs):
    """Hugging Face attention-function protocol: query [1, heads, T, D], key / value
    [1, kv_heads, T, D] -> ([1, T, heads, D], None).  Without ``segments`` this is
    ``sdpa_attention_forward`` itself; with them ``attention_mask`` is not read (the row has
    no padding, and the blocks say who sees whom)."""
    if segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    for unsupported in ("sliding_window", "softcap", "s_aux", "position_bias"):
        if kwargs.get(unsupported) is not None:
            raise ValueError(f"segment attention does not implement {unsupported!r} "
                             f"({type(module).__name__}); run this model without packing")
    if query.shape[0] != 1 or query.shape[2] != segments.width:
        raise ValueError(f"segments of a row of {segments.width} positions, given queries {tuple(query.shape)}")
    if torch.is_autocast_enabled(query.device.type):  # cast once for the row, not at every block's call
        dt = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dt), key.to(dt), value.to(dt)
    # grouped-query heads (fewer key/value heads than query heads): the kernel maps them itself,
    # no repeated copy of the keys (on a 2-core CPU, [1, 9, 200, 64] on 3 heads: 1.30 ms
    # against 1.41 ms with the keys repeated; the same values)
    gqa = key.shape[1] != query.shape[1]
    outputs = []
    for start, end, p0, p1 in segments.blocks:
        q = query[:, :, start:end]
        if p0 == p1 or p1 == start:  # contiguous keys: [start, end) or [p0, end)
            lo = start if p0 == p1 else p0
            k, v = key[:, :, lo:end], value[:, :, lo:end]
        else:
            k = torch.cat([key[:, :, p0:p1], key[:, :, start:end]], 2)
            v = torch.cat([value[:, :, p0:p1], value[:, :, start:end]], 2)
        n_q, n_k = end - start, k.shape[2]
        # bottom-right causal: query j sees keys 0 .. n_k - n_q + j
        mask = None if n_q == n_k else torch.ones(n_q, n_k, dtype=torch.bool, device=q.device).tril(n_k - n_q)
        outputs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                                      is_causal=mask is None, enable_gqa=gqa))
    out = torch.cat(outputs, 2) if len(outputs) > 1 else outputs[0]
    return out.transpose(1, 2).contiguous(), None


def install(model) -> bool:
    """Make ``model`` (through DDP / PEFT wrappers) run :func:`segment_attention`: only a
    model on ``sdpa`` is switched (its calls without segments are unchanged).  Returns whether
    the model now runs it.  The switch is not saved with the model's config."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = getattr(getattr(model, "module", model), "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl == NAME:
        return True
    if impl != "sdpa":
        return False
    AttentionInterface.register(NAME, segment_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)  # padded batches get sdpa's masks
    config._attn_implementation = NAME
    return True
