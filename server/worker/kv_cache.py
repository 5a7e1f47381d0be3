"""The paged KV cache: fixed-size blocks of token positions in one pool, handed out per sequence.

As in vLLM's PagedAttention, a sequence's keys and values live in the blocks of its block table
(block ``b`` holds positions ``b * block_size ...``), so memory goes to tokens that exist instead of
``slots x max_len``. One tensor per cache, ``[layers, blocks, block_size, 2 * kv_heads, head_dim]``:
a token's keys and values are adjacent, so one write per layer stores both (they come out of the
fused ``[q|k|v]`` projection adjacent too). Block 0 is never handed out: block tables are padded with
it, and whatever a padded row reads there is masked out.

The pool is sized in bytes (``--kv-cache-mb``; on CUDA by default a fraction of free device memory,
like vLLM's ``gpu_memory_utilization``), and :func:`check_fits` refuses at start a context that even
an empty pool could not hold.
"""

from __future__ import annotations

import os

import torch

NULL_BLOCK = 0


class OutOfBlocksError(RuntimeError):
    """Not enough free KV blocks for what was asked (the engine checks first, so this is a bug guard)."""


def bytes_per_block(layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return layers * block_size * 2 * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


class PagedKVCache:
    """``num_blocks`` blocks of ``block_size`` positions (block 0 reserved) and their free list."""

    def __init__(self, layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:  # fmt: skip
        if num_blocks < 2:
            raise ValueError(f"a KV cache needs at least 2 blocks (block 0 is reserved), got {num_blocks}")
        self.block_size, self.num_blocks, self.kv_heads = block_size, num_blocks, kv_heads
        self.data = torch.zeros(layers, num_blocks, block_size, 2 * kv_heads, head_dim, dtype=dtype, device=device)
        self._free = list(range(num_blocks - 1, NULL_BLOCK, -1))  # pop() hands out low numbers first
        self._refs: dict[int, int] = {}  # allocated block -> holders (choices of one prompt share blocks)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def capacity_tokens(self) -> int:
        """Positions an empty pool holds (the longest sequence it could ever take)."""
        return self.usable_blocks * self.block_size

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocksError(f"{n} KV blocks asked, {len(self._free)} free")
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self._refs[b] = 1
        return blocks

    def share(self, blocks: list[int]) -> list[int]:
        """Another holder of ``blocks`` (the full prompt blocks the choices of one request share): each
        returns to the free list when its last holder frees it."""
        if not all(b in self._refs for b in blocks):
            raise ValueError(f"KV blocks {blocks} shared but never allocated")
        for b in blocks:
            self._refs[b] += 1
        return list(blocks)

    def copy_block(self, src: int, dst: int) -> None:
        """Block ``dst`` := block ``src`` in every layer (a choice's own copy of a partly filled prompt block)."""
        self.data[:, dst].copy_(self.data[:, src])

    def free(self, blocks: list[int]) -> None:
        if len(set(blocks)) != len(blocks) or not all(b in self._refs for b in blocks):
            raise ValueError(f"KV blocks {blocks} freed twice or never allocated")
        released = []
        for b in blocks:
            self._refs[b] -= 1
            if not self._refs[b]:
                del self._refs[b]
                released.append(b)
        self._free.extend(reversed(released))

    def layer(self, i: int) -> torch.Tensor:
        """Layer ``i``'s cache as ``[blocks * block_size, 2 * kv_heads, head_dim]`` (a view)."""
        return self.data[i].view(-1, *self.data.shape[-2:])


def cuda_kv_budget(free: int, total: int, utilization: float, reserve: int | None) -> tuple[int, int, str]:
    """The KV-cache bytes on a device with ``free`` of ``total`` bytes free once the weights are loaded:
    ``utilization x total`` less what is in use and ``reserve`` (default 15% of what is left) for
    merged mixes, the mix pool and activations. Returns (budget, reserve, how it was computed)."""
    available = int(utilization * total) - (total - free)
    reserved = int(0.15 * available) if reserve is None else reserve
    note = (f"{utilization:.0%} of {total / 2**30:.1f} GiB less {(total - free) / 2**30:.1f} GiB in use "
            f"and {reserved / 2**30:.1f} GiB for merged mixes and activations")  # fmt: skip
    return available - reserved, reserved, note


def available_memory() -> int:
    """Bytes of memory available now: Linux's MemAvailable (free memory plus the page cache it can
    reclaim: just after loading a model's files MemFree alone can be a fraction of a GiB), else the
    free pages, else unbounded."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def cpu_kv_budget(per_block: int, block_size: int, tokens: int, available: int | None = None) -> tuple[int, str]:
    """The default KV-cache bytes off CUDA: room for ``tokens`` positions, at most a quarter of the
    memory available now (a 7B model's 32 x 4096 tokens in fp32 would be 34 GB)."""
    if available is None:
        available = available_memory()
    wanted = per_block * (-(-tokens // block_size) + 1)
    if wanted <= available // 4:
        return wanted, f"default: {tokens} tokens"
    return available // 4, f"default: a quarter of the {available / 2**30:.1f} GiB of memory available"


def check_fits(max_len: int, cache: PagedKVCache, budget_note: str) -> None:
    """Refuse a context longer than the whole pool, saying what would fit."""
    if max_len > cache.capacity_tokens:
        raise ValueError(
            f"--max-len {max_len} does not fit the KV cache: {cache.usable_blocks} blocks of {cache.block_size} "
            f"tokens hold {cache.capacity_tokens} ({budget_note}); lower --max-len to at most "
            f"{cache.capacity_tokens} or give the cache more memory (--kv-cache-mb)"
        )
