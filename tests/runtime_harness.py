"""The runtime driven as the engine drives it, for tests: greedy decoding of a batch of rows on mixes."""

from __future__ import annotations


def greedy(runtime, batch, steps: int = 12, chunk: int | None = None) -> list[list[int]]:
    """Greedy tokens for ``(prompt ids, prepared mix or None)`` rows prefilled together (in chunks of ``chunk``
    tokens, several prompts per forward) and decoded together; the rows' blocks and slots freed after."""
    from server.worker.runtime import DecodeRow, PrefillChunk

    tables = [runtime.kv.allocate(runtime.kv.blocks_for(len(ids) + steps)) for ids, _ in batch]
    slots = [runtime.acquire(mix) for _, mix in batch]
    try:
        done, first = [0] * len(batch), {}
        while todo := [i for i, (ids, _) in enumerate(batch) if done[i] < len(ids)]:
            n = {i: min(len(batch[i][0]) - done[i], chunk or len(batch[i][0])) for i in todo}
            logits = runtime.prefill([PrefillChunk(batch[i][0][done[i] : done[i] + n[i]], done[i], tables[i], *slots[i])
                                      for i in todo])  # fmt: skip
            for row, i in enumerate(todo):
                done[i] += n[i]
                if done[i] == len(batch[i][0]):
                    first[i] = int(logits[row].argmax())
        tokens = [[first[i]] for i in range(len(batch))]
        for _ in range(steps - 1):
            logits = runtime.decode([DecodeRow(tok[-1], len(ids) + len(tok) - 1, t, *s)
                                     for (ids, _), tok, t, s in zip(batch, tokens, tables, slots, strict=True)])  # fmt: skip
            for tok, row in zip(tokens, logits, strict=True):
                tok.append(int(row.argmax()))
        return tokens
    finally:
        for t, s in zip(tables, slots, strict=True):
            runtime.kv.free(t)
            runtime.release(*s)
