"""Tune-job edge paths with the engine stubbed out: a job cancelled before its first step is settled,
queue-full answers are retried, and a failed generation cancels (and aborts) the rest of its trial."""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace

import pytest

import mixserve.tune_jobs as tune_jobs
from mixserve.tune_jobs import TuneJobs
from server.engine.sequence import TokenEvent
from server.entrypoints.state import RequestError

REQUEST = {"tasks": ["sql"], "adapters": None, "budget": 2, "n_val": 2, "methods": None, "space": "lowrank",
           "seed": 0, "pin_as": None}  # fmt: skip


def _state(writes: list | None = None) -> SimpleNamespace:
    tokenizer = lambda text, add_special_tokens=False: {"input_ids": [1, 2, 3]}  # noqa: E731

    async def write(method: str, *args) -> None:
        if writes is not None:
            writes.append((method, *args))

    return SimpleNamespace(
        admin=SimpleNamespace(write=write, tune_results={"old": {"id": "old", "status": "completed", "trials": []}}),
        registry={"sql"}, validate_spec=lambda spec: spec, check_pin_name=lambda name: None,
        resolve=lambda model, mix: SimpleNamespace(key=mix, label=mix),
        runtime=SimpleNamespace(tokenizer=tokenizer, max_len=256),
        config=SimpleNamespace(max_batch=4, limits=SimpleNamespace(max_tokens=64)),
    )  # fmt: skip


class _Handle:
    n = 1  # choices

    def __init__(self, events: list[TokenEvent], log: list[str]) -> None:
        self._events, self.log = events, log

    async def events(self):
        for e in self._events:
            await asyncio.sleep(0.01)
            yield e
            if e.finish_reason:
                return
        await asyncio.sleep(10)  # a generation that has not finished (until the trial is cancelled)

    def abort(self) -> None:
        self.log.append("abort")


def test_a_job_cancelled_before_its_first_step_is_settled():
    async def scenario():
        jobs = TuneJobs(_state())
        job = jobs.start(dict(REQUEST))
        await jobs.cancel(job.id)  # before the task ever ran: _run's own handlers never see it
        return job, jobs

    job, jobs = asyncio.run(scenario())
    assert job.status == "cancelled" and job.finished is not None
    assert jobs.running() == []  # the slot is free: a new job would start


def test_queue_full_is_retried_and_a_failed_generation_cancels_its_trial(monkeypatch):
    monkeypatch.setattr(tune_jobs, "encode_prompt", lambda state, ids: ids)
    log: list[str] = []
    calls = {"n": 0}

    async def start_generation(state, resolved, ids, params):
        calls["n"] += 1
        if calls["n"] <= 2:  # users fill the queue twice: the job waits instead of failing
            raise RequestError(429, "server busy", None, "queue_full")
        log.append("start")
        if resolved.key == "broken" and calls["n"] == 4:
            return SimpleNamespace(handle=_Handle([TokenEvent("", [], "error", error="boom")], log))
        done = [TokenEvent("SELECT 1", [5], None), TokenEvent("", [], "stop")]
        return SimpleNamespace(handle=_Handle(done if resolved.key != "broken" else done[:1], log))

    monkeypatch.setattr(tune_jobs, "start_generation", start_generation)
    examples = {"sql": [SimpleNamespace(prompt=f"p{i}") for i in range(3)]}
    import mixserve.eval.scorers as scorers

    monkeypatch.setattr(scorers, "score", lambda task, exs, outs: SimpleNamespace(accuracy=len(outs) / 10))
    jobs = TuneJobs(_state())

    scores = asyncio.run(jobs._score("good", examples))
    assert scores == {"sql": 0.3} and calls["n"] == 5  # 2 refusals, then 3 generations
    assert log.count("start") == 3 and log.count("abort") == 3

    calls["n"], log[:] = 2, []  # no more refusals; the first generation of "broken" fails
    with pytest.raises(RequestError, match="generation failed: boom"):
        asyncio.run(jobs._score("broken", examples))
    # The failure cancelled the other two generations of the trial, and each was aborted.
    assert log.count("start") == 3 and log.count("abort") == 3


def test_a_failed_pin_leaves_the_search_completed_with_the_error():
    async def pin(name, mix):
        raise RequestError(409, f"{name!r} is already an adapter name", "name", "name_taken")

    async def scenario():
        state = _state()
        state.pin = pin
        jobs = TuneJobs(state)

        async def fake_score(mix, examples):
            return {"sql": 0.5}

        jobs._score = fake_score
        job = jobs.start({**REQUEST, "pin_as": "winner"})
        await job.task
        return job

    job = asyncio.run(scenario())
    assert job.status == "completed" and len(job.trials) == 2 and job.best is not None
    assert job.pinned_as is None and "pinning 'winner' failed" in job.error and "already an adapter" in job.error


def test_a_finished_job_is_written_to_the_state_store_and_stored_jobs_are_listed(monkeypatch):
    import mixserve.eval.tasks as tasks

    def broken_split(*args, **kwargs):
        raise RuntimeError("no data")

    monkeypatch.setattr(tasks, "make_split", broken_split)
    writes: list = []

    async def scenario():
        jobs = TuneJobs(_state(writes))
        job = jobs.start(dict(REQUEST))
        with contextlib.suppress(Exception):
            await job.task
        return job, jobs

    job, jobs = asyncio.run(scenario())
    assert job.status == "failed"
    ((method, job_id, record),) = writes
    assert method == "put_tune_result" and job_id == job.id and record["status"] == "failed" and "trials" in record
    views = jobs.views()
    assert set(views) == {"old", job.id} and "trials" not in views["old"]
