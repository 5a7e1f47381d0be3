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

Each forward's rows are sampled together (:mod:`server.engine.sampler`: one pass, one host copy);
the grammar masks of structured rows are filled on worker threads while the forward runs. A request
for ``n`` choices is admitted with the KV blocks of all of them, prefilled once, then forked: the
choices share the prompt's full blocks and copy its last, partly filled one. Tokens go back to the
request's asyncio queue through ``call_soon_threadsafe``. Detokenisation and stop strings are handled
here, so a stopped sequence frees its blocks at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import torch

from server.engine.sampler import Sampler, SampleRow
from server.engine.sampling import make_generator
from server.engine.sequence import (
    ChoiceGroup,
    GenerationRequest,
    RequestHandle,
    Sequence,
    TokenEvent,
    TokenLogprob,
)
from server.engine.structured import StepMasks, StructuredOutputs
from server.metrics import Metrics
from server.worker.runtime import DecodeRow, ModelRuntime, PrefillChunk

log = logging.getLogger("mixserve.engine")


class QueueFullError(RuntimeError):
    """The waiting queue is at its bound: the caller should answer 429 with Retry-After."""


class EngineStoppedError(RuntimeError):
    """The engine no longer admits requests (draining or stopped)."""


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
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._prefilling: list[Sequence] = []  # running, prompt not all in the KV cache yet (admission order)
        self._ids = itertools.count()
        self._lock = threading.Lock()  # guards _waiting between the loop and the step thread
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self.accepting = True
        self.steps = 0
        eos = runtime.tokenizer.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.sampler = Sampler(runtime.device)
        self.structured: StructuredOutputs | None = None  # set by the server once a request needs it

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
                seq.group.cancelled = True
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
        """Queue ``req`` (its ``n`` choices); raises :class:`QueueFullError` / :class:`EngineStoppedError`."""
        if not self.accepting:
            raise EngineStoppedError("the server is shutting down")
        with self._lock:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFullError(f"{len(self._waiting)} requests are waiting (limit {self.max_waiting})")
            group = ChoiceGroup(req.n)
            self._waiting.append(self._choice(req, group, 0))
        self.metrics.prompt_tokens.labels(req.mix_label).inc(len(req.prompt_ids))
        self._wake.set()
        return RequestHandle(group, self.abort)

    def _choice(self, req: GenerationRequest, group: ChoiceGroup, index: int) -> Sequence:
        params = req.params.for_choice(index)
        seq = Sequence(
            next(self._ids), req, group, params, index, generator=make_generator(params, self.runtime.device)
        )
        if params.grammar is not None:
            seq.matcher = self.structured.matcher(params.grammar)
        if params.repetition_penalty != 1.0:
            seq.prompt_tokens = frozenset(req.prompt_ids)
        return seq

    def abort(self, group: ChoiceGroup) -> None:
        if group.unfinished:
            group.cancelled = True
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

    def _blocks_needed(self, seq: Sequence) -> int:
        """The KV blocks of all of ``seq``'s choices: each its prompt + ``max_tokens``, the prompt's full
        blocks once."""
        kv, prompt = self.runtime.kv, len(seq.req.prompt_ids)
        each = kv.blocks_for(min(prompt + seq.params.max_tokens, self.runtime.max_len))
        return each + (seq.group.n - 1) * (each - prompt // kv.block_size)

    def _schedule_prefill(self) -> list[tuple[Sequence, int]]:
        """``(sequence, prompt tokens)`` to prefill this step: started prompts first, then admissions."""
        budget, work = self.max_prefill_tokens, []
        for seq in self._prefilling:
            n = min(len(seq.req.prompt_ids) - seq.prefilled, budget)
            if n <= 0:
                break
            work.append((seq, n))
            budget -= n
        kv = self.runtime.kv
        while budget > 0:
            with self._lock:
                if not self._waiting:
                    break
                seq = self._waiting[0]
                needed = self._blocks_needed(seq)
                if (len(self._running) + seq.group.n > self.max_batch or needed > kv.free_blocks
                        or not self.runtime.can_acquire(seq.req.lora)):  # fmt: skip
                    break  # first come, first served: wait for places, blocks or a mix slot to free up
                self._waiting.popleft()
            try:
                seq.lora_slot, seq.core_slot = self.runtime.acquire(seq.req.lora)  # may copy the mix in
                seq.blocks = kv.allocate(kv.blocks_for(min(len(seq.req.prompt_ids) + seq.params.max_tokens,
                                                           self.runtime.max_len)))  # fmt: skip
                seq.spare_blocks = kv.allocate(needed - len(seq.blocks))
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

    def _prefill(self, work: list[tuple[Sequence, int]]) -> set[int]:
        """Run the chunks in one forward; sequences whose prompt completed get their first token (they and
        the choices forked from them, whose ids are returned, decode from the next step on)."""
        if not work:
            return set()
        chunks = [PrefillChunk(s.req.prompt_ids[s.prefilled : s.prefilled + n], s.prefilled, s.blocks, s.lora_slot,
                               s.core_slot) for s, n in work]  # fmt: skip
        every = [c for c, (s, _) in enumerate(work) if s.params.prompt_logprobs is not None]
        completing = [s for s, n in work if s.prefilled + n == len(s.req.prompt_ids) and s.params.max_tokens > 0]
        rows = [(s, i) for s in completing for i in range(s.group.n)]  # (parent, choice index) per sample row
        masks = self._start_masks([s if i == 0 else None for s, i in rows])
        try:
            logits, full = self.runtime.prefill_positions(chunks, every)
        except Exception as exc:
            log.exception("prefill failed")
            for seq, _ in work:
                self._finish(seq, "error", error=str(exc))
            return set()
        self.metrics.prefill_tokens.inc(sum(n for _, n in work))
        now, done, last = time.perf_counter(), set(), {}
        for c, (seq, n) in enumerate(work):
            if c in full:
                seq.add_prompt_logprobs(full[c], n)
            seq.prefilled += n
            if seq.prefilled < len(seq.req.prompt_ids):
                continue
            self._prefilling.remove(seq)
            self.metrics.ttft.labels(seq.req.mix_label).observe(now - seq.req.arrival)
            if seq.params.prompt_logprobs is not None:
                self._emit(seq, TokenEvent("", [], prompt_logprobs=seq.prompt_logprobs))
            if seq.params.max_tokens == 0:  # echo only: the prompt's logprobs were the answer
                self._finish(seq, "length")
                continue
            last[seq.id] = c
        if not rows:
            return done
        if masks is not None:
            masks.wait()
        sampled = []
        for r, (seq, i) in enumerate(rows):
            if i and masks is not None:
                masks.copy_row(r, r - i)  # a fresh choice's grammar state is its parent's
            seq.forked = True
            sampled.append(seq if i == 0 else self._fork(seq, i))
        index = torch.tensor([last[s.id] for s, _ in rows], dtype=torch.long, device=logits.device)
        self._sample(sampled, logits[index], masks, now)
        return done | {s.id for s in sampled}

    def _fork(self, parent: Sequence, index: int) -> Sequence:
        """Choice ``index`` of ``parent``'s request, after its prompt is prefilled: the prompt's full
        blocks shared, the partly filled one copied into its own reserved blocks."""
        kv, prompt = self.runtime.kv, len(parent.req.prompt_ids)
        full = prompt // kv.block_size
        own = len(parent.blocks) - full
        child = self._choice(parent.req, parent.group, index)
        child.blocks = kv.share(parent.blocks[:full]) + parent.spare_blocks[:own]
        del parent.spare_blocks[:own]
        if prompt % kv.block_size:
            kv.copy_block(parent.blocks[full], child.blocks[full])
        child.lora_slot, child.core_slot = self.runtime.acquire(parent.req.lora)
        child.prefilled, child.prompt_logprobs = prompt, parent.prompt_logprobs
        self._running.append(child)
        return child

    def _decode(self, seqs: list[Sequence]) -> None:
        self.metrics.batch_size.observe(len(seqs))
        masks = self._start_masks(seqs)
        try:
            logits = self.runtime.decode([DecodeRow(s.tokens[-1], s.position, s.blocks, s.lora_slot, s.core_slot)
                                          for s in seqs])  # fmt: skip
        except Exception as exc:
            log.exception("decode failed")
            for seq in seqs:
                self._finish(seq, "error", error=str(exc))
            return
        now = time.perf_counter()
        for seq in seqs:
            self.metrics.itl.labels(seq.req.mix_label).observe(now - seq.last_token_time)
        self._sample(seqs, logits, masks, now)

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

    # ------------------------------------------------------------------------------------ sampling
    def _start_masks(self, seqs: list[Sequence | None]) -> StepMasks | None:
        """Start filling the grammar masks of the structured rows on worker threads (None: no such row)."""
        rows = [r for r, s in enumerate(seqs) if s is not None and s.matcher is not None]
        if not rows or self.structured is None:
            return None
        return self.structured.step_masks(len(seqs), [seqs[r].matcher for r in rows], rows)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, masks: StepMasks | None, now: float) -> None:
        try:
            if masks is not None:
                masks.wait()  # a matcher's error fails the step's rows below, never silently
            masked = [r for r, s in enumerate(seqs) if s.matcher is not None] if masks is not None else []
            rows = [SampleRow(s.params, s.generator, s.tokens, s.prompt_tokens) for s in seqs]
            result = self.sampler.sample(logits, rows, masks.apply if masks is not None else None, masked)
        except Exception as exc:  # fails these sequences only
            log.exception("sampling failed")
            for seq in seqs:
                self._finish(seq, "error", error=f"sampling failed: {exc}")
            return
        for r, seq in enumerate(seqs):
            seq.last_token_time = now
            self.metrics.generated_tokens.labels(seq.req.mix_label).inc()
            lp = None if result.logprobs[r] is None else TokenLogprob(result.tokens[r], result.logprobs[r],
                                                                      result.top[r])  # fmt: skip
            try:
                out = seq.append(result.tokens[r], lp, self.runtime.tokenizer, self._eos, self.runtime.max_len)
            except ValueError as exc:  # the grammar refused the token
                self._finish(seq, "error", error=str(exc))
                continue
            if out is not None and out.finish_reason:
                self._finish(seq, out.finish_reason, last=(out.text, out.token_ids, out.logprobs or []))
            elif out is not None:
                self._emit(seq, out)

    def _finish(self, seq: Sequence, reason: str, *, error: str | None = None, last=("", [], [])) -> None:
        if seq.finished:
            return
        seq.finished = True
        if seq in self._running:
            self._running.remove(seq)
        if seq in self._prefilling:
            self._prefilling.remove(seq)
        kv = self.runtime.kv
        for blocks in (seq.blocks, seq.spare_blocks):
            if blocks:
                kv.free(blocks)
        seq.blocks, seq.spare_blocks = [], []
        if seq.lora_slot >= 0:
            self.runtime.release(seq.lora_slot, seq.core_slot)
            seq.lora_slot, seq.core_slot = -1, 0
        group, wants = seq.group, seq.params.logprobs is not None
        text, ids, lps = last
        event = TokenEvent(text, list(ids), reason, error, len(seq.req.prompt_ids), len(seq.tokens), seq.index,
                           lps if wants else None, None, seq.cumulative_logprob if wants else None)  # fmt: skip
        self._emit(seq, event)
        group.unfinished -= 1
        if seq.index == 0 and group.n > 1 and not seq.forked:  # the other choices never started: they end too
            for i in range(1, group.n):
                self._emit(seq, TokenEvent("", [], reason, error, len(seq.req.prompt_ids), 0, i))
            group.unfinished -= group.n - 1
        if group.unfinished == 0:
            self.metrics.requests.labels(reason).inc()
            if reason in ("stop", "length"):
                self.metrics.e2e.labels(seq.req.mix_label).observe(time.perf_counter() - seq.req.arrival)
            if seq.req.on_finish is not None and self._loop is not None:
                self._loop.call_soon_threadsafe(seq.req.on_finish)

    def _emit(self, seq: Sequence, event: TokenEvent) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(seq.group.queue.put_nowait, event)
