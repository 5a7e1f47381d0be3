"""Attention over the paged KV cache: one chunk of a prompt, or one token for each of a batch of rows.

Pure functions over tensors (no model, no scheduling). The cache of a layer is viewed as
``[blocks, block_size, 2 * kv_heads, head_dim]`` (keys then values per token); a row's keys are
gathered from its own blocks, padded with the reserved null block, and masked past its position.
Masked keys add exact zeros, so a row's result does not depend on how far the batch's widest row
pads it (batch invariance, tested in ``tests/test_runtime.py``).

A sliding-window layer reads only the blocks its window reaches: its table starts at the row's block
``first`` and the mask compares true key positions (``first * block_size + j``). ``scale`` is the
scores' factor (None: ``head_dim ** -0.5``); ``softcap`` caps the scores as ``cap * tanh(s / cap)``
(Gemma 2), which SDPA cannot, so those layers run the eager product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name


def key_mask(keys: int, positions: torch.Tensor, window: int | None, first: torch.Tensor | int = 0) -> torch.Tensor:
    """``[len(positions), keys]``: key ``j`` (at position ``first + j``; ``first`` per row or one for all) is
    visible to a query at position ``p`` when ``first + j <= p`` (and ``> p - window`` with a window)."""
    j = torch.arange(keys, device=positions.device)[None, :]
    if isinstance(first, torch.Tensor):
        j = j + first[:, None]
    elif first:
        j = j + first
    mask = j <= positions[:, None]
    if window is not None:
        mask &= j > positions[:, None] - window
    return mask


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float | None,
              softcap: float | None) -> torch.Tensor:  # fmt: skip
    """``q [B, H, Lq, d]`` over ``k, v [B, KV, Lk, d]`` (grouped heads), ``mask`` boolean broadcastable to
    ``[B, 1, Lq, Lk]`` (None: causal). Returns ``[B, H, Lq, d]``."""
    kv_heads, heads = k.shape[1], q.shape[1]
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                              enable_gqa=kv_heads != heads)  # fmt: skip
    b, _, lq, d = q.shape
    if mask is None:
        mask = torch.ones(lq, k.shape[2], dtype=torch.bool, device=q.device).tril()
    mask = mask.view(-1, 1, 1, lq, mask.shape[-1])  # broadcast over a KV head's group of query heads
    g = heads // kv_heads
    s = (q.reshape(b, kv_heads, g * lq, d) @ k.transpose(-1, -2)).view(b, kv_heads, g, lq, -1)
    s = torch.tanh(s * (scale or d**-0.5) / softcap) * softcap  # transformers' order of rounding
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1, dtype=torch.float32).to(q.dtype)
    return (p.view(b, kv_heads, g * lq, -1) @ v).view(b, heads, lq, d)


def chunk_attention(cache_blocks: torch.Tensor, blocks: torch.Tensor | None, q: torch.Tensor, new_kv: torch.Tensor,
                    start: int, window: int | None, first: int = 0, scale: float | None = None,
                    softcap: float | None = None) -> torch.Tensor:  # fmt: skip
    """Causal attention of a prompt chunk at positions ``start ...``: ``q [n, H, d]``, ``new_kv [n, 2 KV, d]``
    (the chunk's own keys and values, already written to the cache). ``blocks``: the sequence's
    blocks from block ``first`` to the chunk's end (read when earlier tokens exist). Returns ``[n, H * d]``."""
    n, heads, d = q.shape
    kv_heads = new_kv.shape[1] // 2
    end = start + n
    kv = new_kv if start == 0 else cache_blocks[blocks].flatten(0, 1)  # the whole history is the chunk
    kv = kv.transpose(0, 1)  # [2 KV, keys, d]
    mask = None
    if start > 0 or (window is not None and window < end):
        offset = first * cache_blocks.shape[1] if start else 0
        mask = key_mask(kv.shape[1], torch.arange(start, end, device=q.device), window, offset)
    out = attention(q.transpose(0, 1)[None], kv[None, :kv_heads], kv[None, kv_heads:], mask, scale, softcap)
    return out[0].transpose(0, 1).reshape(n, heads * d)


def decode_attention(cache_blocks: torch.Tensor, table: torch.Tensor, q: torch.Tensor, mask: torch.Tensor,
                     scale: float | None = None, softcap: float | None = None) -> torch.Tensor:  # fmt: skip
    """One query per row over the row's blocks: ``q [B, H, d]``, ``table [B, blocks]``, ``mask [B, 1, 1, keys]``
    (:func:`key_mask`, shaped once per step for every layer). Returns ``[B, H * d]``."""
    b, heads, d = q.shape
    kv = cache_blocks[table].view(b, mask.shape[-1], cache_blocks.shape[2], d).transpose(1, 2)  # [B, 2 KV, keys, d]
    kv_heads = kv.shape[1] // 2
    out = attention(q[:, :, None], kv[:, :kv_heads], kv[:, kv_heads:], mask, scale, softcap)
    return out.view(b, heads * d)
