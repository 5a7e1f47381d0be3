"""Attention over the paged KV cache: one chunk of a prompt, or one token for each of a batch of rows.

Pure functions over tensors (no model, no scheduling). The cache of a layer is viewed as
``[blocks, block_size, 2 * kv_heads, head_dim]`` (keys then values per token); a row's keys are
gathered from its own blocks, padded with the reserved null block, and masked past its position.
Masked keys add exact zeros, so a row's result does not depend on how far the batch's widest row
pads it (batch invariance, tested in ``tests/test_runtime.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name


def key_mask(keys: int, positions: torch.Tensor, window: int | None) -> torch.Tensor:
    """``[len(positions), keys]``: key ``j`` is visible to a query at position ``p`` when ``j <= p``
    (and ``j > p - window`` with a sliding window)."""
    j = torch.arange(keys, device=positions.device)
    mask = j[None, :] <= positions[:, None]
    if window is not None:
        mask &= j[None, :] > positions[:, None] - window
    return mask


def chunk_attention(cache_blocks: torch.Tensor, blocks: torch.Tensor | None, q: torch.Tensor, new_kv: torch.Tensor,
                    start: int, window: int | None) -> torch.Tensor:  # fmt: skip
    """Causal attention of a prompt chunk at positions ``start ...``: ``q [n, H, d]``, ``new_kv [n, 2 KV, d]``
    (the chunk's own keys and values, already written to the cache). ``blocks``: the sequence's
    blocks up to the chunk's end (read when earlier tokens exist). Returns ``[n, H * d]``."""
    n, heads, d = q.shape
    kv_heads = new_kv.shape[1] // 2
    end = start + n
    kv = new_kv if start == 0 else cache_blocks[blocks].flatten(0, 1)  # the whole history is the chunk
    kv = kv.transpose(0, 1)  # [2 KV, keys, d]
    mask = None
    if start > 0 or (window is not None and window < end):
        mask = key_mask(kv.shape[1], torch.arange(start, end, device=q.device), window)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], kv[None, :kv_heads], kv[None, kv_heads:], attn_mask=mask, is_causal=mask is None,
        enable_gqa=kv_heads != heads,
    )  # fmt: skip
    return out[0].transpose(0, 1).reshape(n, heads * d)


def decode_attention(cache_blocks: torch.Tensor, table: torch.Tensor, q: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """One query per row over the row's blocks: ``q [B, H, d]``, ``table [B, blocks]``, ``mask [B, 1, 1, keys]``
    (:func:`key_mask`, shaped once per step for every layer). Returns ``[B, H * d]``."""
    b, heads, d = q.shape
    kv = cache_blocks[table].view(b, mask.shape[-1], cache_blocks.shape[2], d).transpose(1, 2)  # [B, 2 KV, keys, d]
    kv_heads = kv.shape[1] // 2
    out = F.scaled_dot_product_attention(
        q[:, :, None], kv[:, :kv_heads], kv[:, kv_heads:], attn_mask=mask,
        enable_gqa=kv_heads != heads,
    )  # fmt: skip
    return out.view(b, heads * d)
