"""Mix tuning as a background admin job: the same search as ``mixserve tune``, scored through the engine.

``mixserve serve`` mounts it on the server as an extension (:class:`TuneService`: the
``/admin/mixes/tune`` routes and the jobs' lifecycle), so the dependency runs one way: this module
imports ``server`` and ``mixserve.eval``; ``server`` imports neither.

Each trial's mix is validated like any request's, merged through the mix cache and its validation
prompts run greedily through the engine beside user traffic (at most ``concurrency`` of them in
flight, so a job never fills the queue users need); serving goes on while a job runs. One job at a
time by default (409 while one runs). Cancelling stops the search, aborts its in-flight generations
and drops the job's examples and sampler; the trial mixes it merged stay in the cache as ordinary
unpinned entries, which the LRU evicts first under pressure. On completion the best mix can be pinned
under a name. Only the validation split is used; the test split is never touched by a server job.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from merging.merge import mix_key
from server.engine.sampling import SamplingParams
from server.entrypoints.generation import collect, encode_prompt, start_generation
from server.entrypoints.routes_admin import require_admin
from server.entrypoints.state import RequestError, ResolvedMix, ServerState

log = logging.getLogger("mixserve.tune")
MAX_FINISHED_JOBS = 16  # finished jobs kept for GET
QUEUE_FULL_RETRIES = 40  # ~1 min of backoff while user traffic keeps the queue full


class TuneJobRequest(BaseModel):
    """``POST /admin/mixes/tune``: what to search (see ``mixserve tune --help``); bounds checked server-side."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str] | None = Field(None, max_length=16, description="tasks to score (default: every task with "
                                    "a registered adapter of its name)")  # fmt: skip
    adapters: list[str] | None = Field(None, max_length=16, description="adapters to merge (default: the tasks')")
    budget: int = Field(20, description="trials (1 to 1000)")
    n_val: int = Field(20, description="validation examples per task (1 to 500)")
    methods: list[str] | None = Field(None, max_length=32, description="methods to choose among (default: all tunable)")
    space: str = Field("lowrank", description="'lowrank', 'dense' or 'both' (searched)")
    seed: int = Field(0, ge=0, le=2**31 - 1)
    pin_as: str | None = Field(None, description="pin the best mix under this name when the job completes")


@dataclass
class TuneJob:
    id: str
    request: dict
    status: str = "running"  # running | completed | failed | cancelled
    started: float = field(default_factory=time.time)
    finished: float | None = None
    budget: int = 0
    best: dict | None = None
    trials: list[dict] = field(default_factory=list)
    error: str | None = None
    pinned_as: str | None = None
    reference: dict[str, float] = field(default_factory=dict)
    task: asyncio.Task | None = None

    def view(self, *, with_trials: bool = False) -> dict[str, Any]:
        out = {
            "id": self.id, "status": self.status, "trials_done": len(self.trials), "budget": self.budget,
            "started": self.started, "finished": self.finished, "best": self.best, "error": self.error,
            "pinned_as": self.pinned_as, "validation_reference": self.reference, "request": self.request,
        }  # fmt: skip
        if with_trials:
            out["trials"] = self.trials
        return out


class TuneJobs:
    """The server's tune jobs (owned by ``ServerState``; one running at a time by default)."""

    def __init__(self, state: ServerState, max_running: int = 1) -> None:
        self.state, self.max_running = state, max_running
        self.jobs: dict[str, TuneJob] = {}

    def running(self) -> list[TuneJob]:
        return [j for j in self.jobs.values() if j.status == "running"]

    def start(self, request: dict) -> TuneJob:
        """Validate ``request`` (a ``TuneJobRequest`` dump) and start the job; raises ``RequestError``."""
        from mixserve.eval.tasks import TASKS
        from mixserve.eval.tune import SearchSpace, check_tune_request

        tasks = request["tasks"] or [t for t in TASKS if t in self.state.registry]
        adapters = request["adapters"] or tasks
        try:
            check_tune_request(tasks, TASKS, request["budget"], request["n_val"])
            search = SearchSpace(
                methods=tuple(request["methods"]) if request["methods"] else SearchSpace().methods,
                space=request["space"],
            )
        except ValueError as exc:
            raise RequestError(400, str(exc), None, "invalid_tune_request") from None
        missing = [t for t in tasks if t not in self.state.registry]
        if missing:
            raise RequestError(400, f"no registered adapter named after task(s) {', '.join(missing)}: retention "
                               "needs each task's own adapter", "tasks", "unknown_adapter")  # fmt: skip
        # A mix of every adapter the job will merge, checked like any request's (names, bounds).
        self.state.validate_spec({"method": "task_arithmetic", "children": [{"adapter": a} for a in adapters]})
        if len(set(adapters)) != len(adapters):
            raise RequestError(400, "an adapter is named twice", "adapters", "invalid_tune_request")
        name = request.get("pin_as")
        if name is not None:
            self.state.check_pin_name(name)
        if self.max_running == 0:
            raise RequestError(409, "tune jobs are disabled on this server (--max-tune-jobs 0)", None, "tune_disabled")
        if len(self.running()) >= self.max_running:
            raise RequestError(409, "a tune job is already running; cancel it (DELETE /admin/mixes/tune/{id}) or "
                               "wait for it to finish", None, "tune_busy")  # fmt: skip
        job = TuneJob(
            uuid.uuid4().hex[:12], {**request, "tasks": tasks, "adapters": adapters}, budget=request["budget"]
        )
        job.task = asyncio.create_task(self._run(job, search))
        job.task.add_done_callback(functools.partial(self._settle, job))
        self.jobs[job.id] = job
        self._forget_old()
        return job

    def get(self, job_id: str) -> TuneJob:
        if job_id not in self.jobs:
            raise RequestError(404, f"no tune job {job_id!r}", "id", "not_found")
        return self.jobs[job_id]

    def views(self, *, with_trials: bool = False) -> dict[str, dict]:
        """Every job: those of this process, and the finished ones the state store holds (from before a
        restart, or from another replica)."""
        stored = {k: v if with_trials else {x: y for x, y in v.items() if x != "trials"}
                  for k, v in self.state.admin.tune_results.items()}  # fmt: skip
        return stored | {j.id: j.view(with_trials=with_trials) for j in self.jobs.values()}

    async def cancel(self, job_id: str) -> TuneJob:
        job = self.get(job_id)
        if job.status == "running" and job.task is not None:
            job.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await job.task
        return job

    async def shutdown(self) -> None:
        for job in self.running():
            await self.cancel(job.id)

    @staticmethod
    def _settle(job: TuneJob, task: asyncio.Task) -> None:
        # A task cancelled before its first step never entered _run's try: its job must not stay "running".
        if job.status == "running":
            job.status = "cancelled" if task.cancelled() else "failed"
            job.finished = job.finished or time.time()

    def _forget_old(self) -> None:
        finished = sorted((j for j in self.jobs.values() if j.status != "running"), key=lambda j: j.finished or 0)
        for job in finished[: max(0, len(finished) - MAX_FINISHED_JOBS)]:
            del self.jobs[job.id]

    # -------------------------------------------------------------------------------- the search
    async def _run(self, job: TuneJob, search) -> None:
        from mixserve.eval.tasks import make_split
        from mixserve.eval.tune import MixTuner

        req = job.request
        try:
            val = {t: make_split(t, "val", req["n_val"]) for t in req["tasks"]}
            for t in req["tasks"]:
                job.reference[t] = (await self._score(t, {t: val[t]}))[t]
            tuner = MixTuner(req["adapters"], job.reference, budget=req["budget"], search=search, seed=req["seed"])
            while not tuner.done:
                number, mix = tuner.ask()
                t0 = time.perf_counter()
                try:
                    scores, error = await self._score(mix, val), None
                except RequestError as exc:  # a mix the server refuses or cannot merge: a failed trial
                    scores, error = None, exc.message
                rec = tuner.tell(number, mix, scores, time.perf_counter() - t0, error)
                job.trials.append({"number": rec.number, "mix": rec.mix, "mean_kept": rec.mean,
                                   "worst_kept": rec.worst, "seconds": rec.seconds, "error": rec.error})  # fmt: skip
                job.best = tuner.summary()["best"]
            if job.best is None:
                raise RuntimeError("no trial could be scored")
            if req.get("pin_as"):
                try:
                    await self.state.pin(req["pin_as"], job.best["mix"])
                    job.pinned_as = req["pin_as"]
                except RequestError as exc:  # e.g. an adapter registered under that name meanwhile
                    job.error = f"the search completed but pinning {req['pin_as']!r} failed: {exc.message}"
            job.status = "completed"
        except asyncio.CancelledError:
            job.status = "cancelled"
            raise
        except Exception as exc:  # the job fails; the server keeps serving
            log.exception("tune job %s failed", job.id)
            job.status, job.error = "failed", f"{type(exc).__name__}: {getattr(exc, 'message', exc)}"
        finally:
            job.finished = time.time()
            # The result survives restarts (the state store); failing to store it leaves it in memory only.
            try:
                await asyncio.shield(self.state.admin.write("put_tune_result", job.id, job.view(with_trials=True)))
            except Exception as exc:
                log.warning("tune job %s: result not stored: %s", job.id, exc)
            job.task = None

    async def _score(self, mix: dict | str, examples: dict) -> dict[str, float]:
        """Greedy generations of ``examples`` under ``mix`` through the engine, scored per task."""
        from mixserve.eval.scorers import score

        state = self.state
        if isinstance(mix, str):
            resolved = state.resolve(None, mix)
        else:
            spec = state.validate_spec(mix)
            resolved = ResolvedMix("tune", mix_key(spec, state.registry.snapshot()), spec)
        limit = asyncio.Semaphore(max(1, state.config.max_batch // 2))
        max_tokens = self.jobs_max_tokens()

        async def one(prompt: str) -> str:
            # Tokenized as the offline harness does (no special tokens), checked like any request's prompt.
            ids = encode_prompt(state, state.runtime.tokenizer(prompt, add_special_tokens=False)["input_ids"])
            async with limit:
                for attempt in range(QUEUE_FULL_RETRIES + 1):
                    try:
                        gen = await start_generation(
                            state, resolved, ids, SamplingParams(max_tokens, 0.0, 1.0, (), None)
                        )
                        break
                    except RequestError as exc:  # users filled the queue: wait, do not fail the trial
                        if exc.status != 429 or attempt == QUEUE_FULL_RETRIES:
                            raise
                        await asyncio.sleep(min(2.0, 0.05 * 2**attempt))
                text, _ = await collect(gen, None)  # aborted (its KV blocks freed) if the job is cancelled
                return text

        scores = {}
        for task, exs in examples.items():
            # A TaskGroup cancels (and so aborts) the other generations when one fails.
            try:
                async with asyncio.TaskGroup() as group:
                    pending = [group.create_task(one(e.prompt)) for e in exs]
            except ExceptionGroup as eg:  # the first failure, as the trial's error
                raise eg.exceptions[0] from None
            outputs = [p.result() for p in pending]
            # Code tasks run the generated functions in sandboxed subprocesses: off the event loop.
            result = await asyncio.to_thread(score, task, exs, outputs)
            scores[task] = result.accuracy
        return scores

    def jobs_max_tokens(self) -> int:
        return min(64, self.state.config.limits.max_tokens, self.state.runtime.max_len // 2)


class TuneService:
    """The tune jobs as a server extension (``server.entrypoints.api.Extension``): ``POST /admin/mixes/tune`` starts a
    job, ``GET`` lists them or shows one with its trials, ``DELETE`` cancels; admin token required."""

    def __init__(self) -> None:
        self.jobs: TuneJobs | None = None
        self.router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])
        self.router.add_api_route("/mixes/tune", self.start_job, methods=["POST"], status_code=202)
        self.router.add_api_route("/mixes/tune", self.list_jobs, methods=["GET"])
        self.router.add_api_route("/mixes/tune/{job_id}", self.get_job, methods=["GET"])
        self.router.add_api_route("/mixes/tune/{job_id}", self.cancel_job, methods=["DELETE"])

    def attach(self, state: ServerState) -> None:
        self.jobs = TuneJobs(state, state.config.max_tune_jobs)

    async def shutdown(self) -> None:
        if self.jobs is not None:
            await self.jobs.shutdown()

    def _jobs(self) -> TuneJobs:
        if self.jobs is None:  # require_admin answered 503 first while loading; kept for safety
            raise RequestError(503, "the server is still loading", None, "loading")
        return self.jobs

    async def start_job(self, body: TuneJobRequest) -> dict:
        """Start a background search for the best mix (one at a time: 409 while one runs)."""
        return self._jobs().start(body.model_dump()).view()

    async def list_jobs(self) -> dict:
        return {"jobs": list(self._jobs().views().values())}

    async def get_job(self, job_id: str) -> dict:
        views = self._jobs().views(with_trials=True)
        if job_id not in views:
            raise RequestError(404, f"no tune job {job_id!r}", "id", "not_found")
        return views[job_id]

    async def cancel_job(self, job_id: str) -> dict:
        """Cancel a running job (its in-flight generations are aborted); a finished one is left as it is."""
        return (await self._jobs().cancel(job_id)).view()
