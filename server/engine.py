"""The engine: continuous batching over the model runtime, one step at a time.

Each step (run in a worker thread, so the event loop keeps serving HTTP):
1. drops cancelled sequences and frees their KV slots;
2. admits waiting requests while a slot and the batch budget allow, prefilling each (its first
   token comes out of the prefill);
3. decodes one token for every other running sequence in a single batched forward, rows sorted by
   mix so each mix is one contiguous segment of the LoRA side path.

Tokens go back to the request's asyncio queue through ``call_soon_threadsafe``. Detokenisation and
stop strings are handled here, so a stopped sequence frees its slot at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import torch

from server.metrics import Metrics
from server.runtime import ModelRuntime, PreparedLora, Segment
from server.sampling import SamplingParams, make_generator, sample_next

log = logging.getLogger("mixserve.engine")


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound: the caller should answer 429 with Retry-After."""


class EngineStoppedError(RuntimeError):
    """The engine no longer admits requests (draining or stopped)."""


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    lora: PreparedLora | None = None
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
    slot: int = -1
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
    def position(self) -> int:  # tokens already in the KV slot
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
        max_prefill_tokens: int = 2048,
    ) -> None:
        self.runtime, self.metrics = runtime, metrics
        self.max_batch = min(max_batch, runtime.kv.free_slots)
        self.max_waiting = max_waiting
        # Prompt tokens prefilled per step (at least one prompt): bounds the stall of running sequences.
        self.max_prefill_tokens = max_prefill_tokens
        self._waiting: deque[_Sequence] = deque()
        self._running: list[_Sequence] = []
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
                await asyncio.to_thread(self._step_while_busy)
            except Exception:  # the step already failed its sequences; keep serving the rest
                log.exception("engine step failed")

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
        admitted = self._admit()
        decoding = sorted((s for s in self._running if s not in admitted), key=lambda s: s.req.mix_key)
        if decoding:
            self._decode(decoding)
        self._update_gauges()

    def _admit(self) -> list[_Sequence]:
        admitted: list[_Sequence] = []
        budget = self.max_prefill_tokens
        while len(self._running) < self.max_batch and self.runtime.kv.free_slots:
            with self._lock:
                if not self._waiting or (admitted and len(self._waiting[0].req.prompt_ids) > budget):
                    break
                seq = self._waiting.popleft()
            budget -= len(seq.req.prompt_ids)
            seq.slot = self.runtime.kv.allocate()
            self._running.append(seq)
            admitted.append(seq)
            try:
                logits = self.runtime.prefill(seq.slot, seq.req.prompt_ids, seq.req.lora)
            except Exception as exc:
                log.exception("prefill failed")
                self._finish(seq, "error", error=str(exc))
                continue
            now = time.perf_counter()
            self.metrics.ttft.labels(seq.req.mix_label).observe(now - seq.arrival)
            self._append(seq, sample_next(logits, seq.req.params, seq.generator), now)
        return admitted

    def _decode(self, seqs: list[_Sequence]) -> None:
        segments, start = [], 0
        for _key, group in itertools.groupby(seqs, key=lambda s: s.req.mix_key):
            members = list(group)
            segments.append(Segment(start, start + len(members), members[0].req.lora))
            start += len(members)
        self.metrics.batch_size.observe(len(seqs))
        try:
            logits = self.runtime.decode(
                [s.slot for s in seqs], [s.tokens[-1] for s in seqs], [s.position for s in seqs], segments
            )
        except Exception as exc:
            log.exception("decode failed")
            for seq in seqs:
                self._finish(seq, "error", error=str(exc))
            return
        now = time.perf_counter()
        for row, seq in enumerate(seqs):
            self.metrics.itl.labels(seq.req.mix_label).observe(now - seq.last_token_time)
            self._append(seq, sample_next(logits[row], seq.req.params, seq.generator), now)

    def _append(self, seq: _Sequence, token: int, now: float) -> None:
        """Record one generated token, emit the text it completes, finish the sequence if it ends."""
        seq.last_token_time = now
        params = seq.req.params
        self.metrics.generated_tokens.labels(seq.req.mix_label).inc()
        if token in self._eos and not params.ignore_eos:
            self._finish(seq, "stop")
            return
        seq.tokens.append(token)
        seq.pending_ids.append(token)
        text = self._detokenize(seq)
        finish = None
        if params.stop:
            hits = [i for i in (text.find(s, max(0, seq.emitted_chars - len(s))) for s in params.stop) if i >= 0]
            if hits:
                text, finish = text[: min(hits)], "stop"
        if finish is None and len(seq.tokens) >= params.max_tokens:
            finish = "length"
        if finish is None and seq.position + 1 >= self.runtime.max_len:
            finish = "length"  # the KV slot is full
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
        if seq.slot >= 0:
            self.runtime.kv.release(seq.slot)
            seq.slot = -1
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
        self.metrics.running.set(len(self._running))
        self.metrics.waiting.set(len(self._waiting))
        self.metrics.set_lora_info(
            {s.req.mix_label for s in self._running if s.req.mix_key},
            {s.req.mix_label for s in list(self._waiting) if s.req.mix_key},
        )
