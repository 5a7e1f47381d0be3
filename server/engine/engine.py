"""The engine: continuous batching over the model runtime, one step at a time.

Each step (run in a worker thread, so the event loop keeps serving HTTP):
1. drops cancelled sequences and frees their KV blocks and mix slot;
2. prefills up to ``max_prefill_tokens`` prompt tokens in one forward: first the rest of prompts
   already started, then new admissions (a request is admitted when a batch place, the KV blocks for
   its prompt plus ``max_tokens`` and a mix-pool slot are free; first come, first served). A long
   prompt goes in chunks over several steps, so running streams keep getting a token every step; a
   prompt's last chunk yields its first token;
3. decodes one token for every other running sequence in a single batched forward (rows sorted by
   mix-pool slot, the pooled side path's order).

Tokens go back to the request's asyncio queue through ``call_soon_threadsafe``. Detokenisation and
stop strings are handled here, so a stopped sequence frees its blocks at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from server.adapters.lora_pool import PreparedLora
from server.adapters.member_pool import PreparedMembers
from server.engine.sampling import SamplingParams, make_generator, sample_next
from server.metrics import Metrics
from server.worker.runtime import DecodeRow, ModelRuntime, PrefillChunk

log = logging.getLogger("mixserve.engine")


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound: the caller should answer 429 with Retry-After."""


class EngineStoppedError(RuntimeError):
    """The engine no longer admits requests (draining or stopped)."""


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    lora: PreparedLora | PreparedMembers | None = None  # factors (factor pool) or member cores (member pool)
    mix_key: str = ""  # "" = the base model; equal keys share a side-path segment
    mix_label: str = "base"  # bounded metrics label: base, an adapter or pinned name, or "adhoc"
    on_finish: Callable[[], None] | None = None  # e.g. release the mix-cache lease (called on the loop)
    arrival: float = field(default_factory=time.perf_counter)  # set before any merge: TTFT includes it


@dataclass
class TokenEvent:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class _Sequence:
    id: int
    req: GenerationRequest
    queue: asyncio.Queue[TokenEvent]
    arrival: float
    blocks: list[int] = field(default_factory=list)  # KV block table (reserved for prompt + max_tokens)
    lora_slot: int = -1  # the mix's factor-pool slot while running (-1: no slots held)
    core_slot: int = 0  # the mix's member-pool slot while running
    prefilled: int = 0  # prompt tokens already in the KV cache
    tokens: list[int] = field(default_factory=list)
    emitted_chars: int = 0
    pending_ids: list[int] = field(default_factory=list)
    text: str = ""  # decoded so far (complete characters only)
    prefix_offset: int = 0  # incremental detokenisation window, as in vLLM
    read_offset: int = 0
    last_token_time: float = 0.0
    cancelled: bool = False
    finished: bool = False
    generator: torch.Generator | None = None

    @property
    def position(self) -> int:  # tokens already in the KV cache when decoding
        return len(self.req.prompt_ids) + len(self.tokens) - 1


class RequestHandle:
    """What a caller gets back from :meth:`Engine.submit`: an async stream of events and an abort."""

    def __init__(self, engine: Engine, seq: _Sequence) -> None:
        self._engine, self._seq = engine, seq

    def abort(self) -> None:
        self._engine.abort(self._seq)

    async def events(self) -> AsyncIterator[TokenEvent]:
        while True:
            event = await self._seq.queue.get()
            yield event
            if event.finish_reason is not None:
                return


class Engine:
    """Continuous batching: at most ``max_batch`` running sequences, at most ``max_waiting`` queued."""

    def __init__(
        self,
        runtime: ModelRuntime,
        metrics: Metrics,
        *,
        max_batch: int = 32,
        max_waiting: int = 256,
        max_prefill_tokens: int = 512,
        step_executor: ThreadPoolExecutor | None = None,
    ) -> None:
        self.runtime, self.metrics = runtime, metrics
        # Every step runs on one long-lived thread (the one that loaded the model, when the app passes
        # it): torch's CPU thread pool is per calling thread, and steps hopping between threads, each
        # with its own pool, ran up to 2x slower on 2 cores (measured).
        self._own_executor = step_executor is None
        self._step_executor = step_executor or ThreadPoolExecutor(1, thread_name_prefix="mixserve-engine")
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        # Prompt tokens prefilled per step: bounds the stall of running sequences (long prompts are chunked).
        self.max_prefill_tokens = max_prefill_tokens
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
        self._prefilling: list[_Sequence] = []  # running, prompt not all in the KV cache yet (admission order)
        self._ids = itertools.count()
        self._lock = threading.Lock()  # guards _waiting between the loop and the step thread
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self.accepting = True
        self.steps = 0
        eos = runtime.tokenizer.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [eos]) - {None}

    # ------------------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name="mixserve-engine")

    async def drain(self, timeout: float) -> bool:
        """Stop admitting; wait up to ``timeout`` s for in-flight requests. True if all finished."""
        self.accepting = False
        deadline = time.monotonic() + timeout
        while self.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return not self.busy

    async def stop(self) -> None:
        self.accepting = False
        with self._lock:
            for seq in list(self._waiting) + self._running:
                seq.cancelled = True
        self._wake.set()
        if self._task is not None:
            for _ in range(200):  # let the step thread abort what is left
                if not self.busy:
                    break
                await asyncio.sleep(0.01)
            self._task.cancel()
        if self._own_executor:
            self._step_executor.shutdown(wait=False)

    @property
    def busy(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    # ------------------------------------------------------------------------------------ requests
    def submit(self, req: GenerationRequest) -> RequestHandle:
        if not self.accepting:
            raise EngineStoppedError("the server is shutting down")
        with self._lock:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFullError(f"{len(self._waiting)} requests are waiting (limit {self.max_waiting})")
            seq = _Sequence(next(self._ids), req, asyncio.Queue(), req.arrival)
            seq.generator = make_generator(req.params)
            self._waiting.append(seq)
        self.metrics.prompt_tokens.labels(req.mix_label).inc(len(req.prompt_ids))
        self._wake.set()
        return RequestHandle(self, seq)

    def abort(self, seq: _Sequence) -> None:
        if not seq.finished:
            seq.cancelled = True
            self._wake.set()

    async def _run(self) -> None:
        while True:
            if not self.busy:
                self._wake.clear()
                self._update_gauges()
                await self._wake.wait()
            try:
                # One worker-thread hop per busy period, not per token: the thread keeps stepping
                # while there is work; arrivals and aborts reach it through the queue and flags.
                await asyncio.get_running_loop().run_in_executor(self._step_executor, self._step_while_busy)
            except Exception as exc:  # a bug outside the forward passes: fail what is running, keep serving
                log.exception("engine step failed")
                for seq in list(self._running):
                    self._finish(seq, "error", error=f"engine step failed: {exc}")

    # ---------------------------------------------------------------------------------------- step
    def _step_while_busy(self) -> None:
        while self.busy:
            self.step()

    def step(self) -> None:
        """One scheduling step (worker thread)."""
        self.steps += 1
        for seq in [s for s in self._running if s.cancelled]:
            self._finish(seq, "abort")
        with self._lock:
            for seq in [s for s in self._waiting if s.cancelled]:
                self._waiting.remove(seq)
                self._finish(seq, "abort")
        prefilled = self._prefill(self._schedule_prefill())
        decoding = sorted((s for s in self._running if s.tokens and s.id not in prefilled), key=lambda s: s.lora_slot)
        if decoding:
            self._decode(decoding)
        self._update_gauges()

    def _blocks_needed(self, seq: _Sequence) -> int:
        tokens = min(len(seq.req.prompt_ids) + seq.req.params.max_tokens, self.runtime.max_len)
        return self.runtime.kv.blocks_for(tokens)

    def _schedule_prefill(self) -> list[tuple[_Sequence, int]]:
        """``(sequence, prompt tokens)`` to prefill this step: started prompts first, then admissions."""
        budget, work = self.max_prefill_tokens, []
        for seq in self._prefilling:
            n = min(len(seq.req.prompt_ids) - seq.prefilled, budget)
            if n <= 0:
                break
            work.append((seq, n))
            budget -= n
        kv = self.runtime.kv
        while budget > 0 and len(self._running) < self.max_batch:
            with self._lock:
                if not self._waiting:
                    break
                seq = self._waiting[0]
                needed = self._blocks_needed(seq)
                if needed > kv.free_blocks or not self.runtime.can_acquire(seq.req.lora):
                    break  # first come, first served: wait for blocks or a mix slot to free up
                self._waiting.popleft()
            try:
                seq.lora_slot, seq.core_slot = self.runtime.acquire(seq.req.lora)  # may copy the mix in
                seq.blocks = kv.allocate(needed)
            except Exception as exc:
                log.exception("admission failed")
                self._finish(seq, "error", error=str(exc))  # frees whatever it got
                continue
            self._running.append(seq)
            self._prefilling.append(seq)
            n = min(len(seq.req.prompt_ids), budget)
            work.append((seq, n))
            budget -= n
        return work

    def _prefill(self, work: list[tuple[_Sequence, int]]) -> set[int]:
        """Run the chunks in one forward; sequences whose prompt completed get their first token (their
        ids are returned: they decode from the next step on)."""
        if not work:
            return set()
        chunks = [PrefillChunk(s.req.prompt_ids[s.prefilled : s.prefilled + n], s.prefilled, s.blocks, s.lora_slot,
                               s.core_slot) for s, n in work]  # fmt: skip
        try:
            logits = self.runtime.prefill(chunks)
        except Exception as exc:
            log.exception("prefill failed")
            for seq, _ in work:
                self._finish(seq, "error", error=str(exc))
            return set()
        now, done = time.perf_counter(), set()
        for row, (seq, n) in enumerate(work):
            seq.prefilled += n
            if seq.prefilled < len(seq.req.prompt_ids):
                continue
            self._prefilling.remove(seq)
            done.add(seq.id)
            self.metrics.ttft.labels(seq.req.mix_label).observe(now - seq.arrival)
            self._sample_and_append(seq, logits[row], now)
        return done

    def _decode(self, seqs: list[_Sequence]) -> None:
        self.metrics.batch_size.observe(len(seqs))
        try:
            logits = self.runtime.decode([DecodeRow(s.tokens[-1], s.position, s.blocks, s.lora_slot, s.core_slot)
                                          for s in seqs])  # fmt: skip
        except Exception as exc:
            log.exception("decode failed")
            for seq in seqs:
                self._finish(seq, "error", error=str(exc))
            return
        now = time.perf_counter()
        for row, seq in enumerate(seqs):
            self.metrics.itl.labels(seq.req.mix_label).observe(now - seq.last_token_time)
            self._sample_and_append(seq, logits[row], now)

    def _sample_and_append(self, seq: _Sequence, logits: torch.Tensor, now: float) -> None:
        try:
            token = sample_next(logits, seq.req.params, seq.generator)
        except Exception as exc:  # fails this sequence only
            log.exception("sampling failed")
            self._finish(seq, "error", error=f"sampling failed: {exc}")
            return
        self._append(seq, token, now)

    def _append(self, seq: _Sequence, token: int, now: float) -> None:
        """Record one generated token, emit the text it completes, finish the sequence if it ends."""
        seq.last_token_time = now
        params = seq.req.params
        self.metrics.generated_tokens.labels(seq.req.mix_label).inc()
        finish = None
        if token in self._eos and not params.ignore_eos:
            # The end: what was held back for stop matching (below) is sent now, or it would be lost.
            text, finish = seq.text, "stop"
        else:
            seq.tokens.append(token)
            seq.pending_ids.append(token)
            text = self._detokenize(seq)
        if params.stop and finish is None:
            hits = [i for i in (text.find(s, max(0, seq.emitted_chars - len(s))) for s in params.stop) if i >= 0]
            if hits:
                text, finish = text[: min(hits)], "stop"
        if finish is None and len(seq.tokens) >= params.max_tokens:
            finish = "length"
        if finish is None and seq.position + 1 >= self.runtime.max_len:
            finish = "length"  # the context is full
        # Hold back what could still become a stop string (incomplete UTF-8 never reaches `text`).
        hold = 0 if finish else max((len(s) - 1 for s in params.stop), default=0)
        end = max(seq.emitted_chars, len(text) - hold)
        if end > seq.emitted_chars or finish:
            delta = text[seq.emitted_chars : end]
            seq.emitted_chars = end
            ids, seq.pending_ids = seq.pending_ids, []
            if finish:
                self._finish(seq, finish, last=(delta, ids))
            else:
                self._emit(seq, TokenEvent(delta, ids))

    def _detokenize(self, seq: _Sequence) -> str:
        """The sequence's text so far, decoding only a short window of recent tokens per step: the text
        of tokens[prefix:] minus that of tokens[prefix:read] is what the new tokens add (the window's
        first token gives SentencePiece its leading-space context); an incomplete UTF-8 character
        waits for the token that completes it."""
        tok = self.runtime.tokenizer
        before = tok.decode(seq.tokens[seq.prefix_offset : seq.read_offset], skip_special_tokens=True)
        after = tok.decode(seq.tokens[seq.prefix_offset :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            seq.text += after[len(before) :]
            seq.prefix_offset, seq.read_offset = seq.read_offset, len(seq.tokens)
        return seq.text

    def _finish(self, seq: _Sequence, reason: str, *, error: str | None = None, last=("", [])) -> None:
        if seq.finished:
            return
        seq.finished = True
        if seq in self._running:
            self._running.remove(seq)
        if seq in self._prefilling:
            self._prefilling.remove(seq)
        if seq.blocks:
            self.runtime.kv.free(seq.blocks)
            seq.blocks = []
        if seq.lora_slot >= 0:
            self.runtime.release(seq.lora_slot, seq.core_slot)
            seq.lora_slot, seq.core_slot = -1, 0
        self.metrics.requests.labels(reason).inc()
        if reason in ("stop", "length"):
            self.metrics.e2e.labels(seq.req.mix_label).observe(time.perf_counter() - seq.arrival)
        text, ids = last
        event = TokenEvent(text, list(ids), reason, error, len(seq.req.prompt_ids), len(seq.tokens))
        self._emit(seq, event)
        if seq.req.on_finish is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(seq.req.on_finish)

    def _emit(self, seq: _Sequence, event: TokenEvent) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(seq.queue.put_nowait, event)

    def _update_gauges(self) -> None:
        kv = self.runtime.kv
        self.metrics.kv_usage.set(1 - kv.free_blocks / kv.usable_blocks)
        self.metrics.running.set(len(self._running))
        self.metrics.waiting.set(len(self._waiting))
        self.metrics.observe_member_pool(self.runtime.cores)
        self.metrics.set_lora_info(
            {s.req.mix_label for s in self._running if s.req.mix_key},
            {s.req.mix_label for s in list(self._waiting) if s.req.mix_key},
        )
