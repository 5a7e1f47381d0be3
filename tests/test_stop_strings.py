"""Stop strings through real HTTP: every endpoint, streamed and not, for each way a generation ends.

Regression (issue 33): a request with a stop list that ended on the end-of-sequence token lost the last
``len(longest stop) - 1`` characters, which the engine held back in case they began a stop string and
never sent (lm-eval-harness, which always sends a stop list, scored the demo 0/10 on prompts it answers
10/10 without one).
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from server.config import ServeConfig
from tests.server_harness import running_server

DEMO = Path(__file__).resolve().parents[1] / "mixserve" / "demo"
pytestmark = pytest.mark.skipif(not (DEMO / "base" / "model.safetensors").is_file(), reason="mixserve/demo not trained")
# The README's prompts: each adapter and the pinned all-four mix answer them and end on EOS inside 48 tokens.
PROMPTS = {
    "sql": "### task: sql\n### input: CREATE TABLE books (title TEXT, author TEXT, year INT, pages INT) ; "
    "what is the total pages of books with author koda\n### output:\n",
    "json": "### task: json\n### input: godu works as a nogama in vomo and is 81.\n### output:\n",
    "pystr": "### task: pystr\n### input: write replace_m(s) that returns s with every m replaced by z\n### output:\n",
}
# (model, prompt): the adapters on their own task, and `all-tasks` (the demo's pin) on every README prompt.
CASES = [("sql", "sql"), ("json", "json"), *(("all-tasks", task) for task in PROMPTS)]
NEVER = ["ZZZ", "ZZZZZZZZ"]  # the reproduction: a stop list that never matches
ENDPOINTS = ("completions", "chat", "generate")


@pytest.fixture(scope="module")
def url():
    config = ServeConfig(model=DEMO / "base", adapters=DEMO / "adapters", pin_file=DEMO / "pins.yaml")
    with running_server(config) as (base, _):
        yield base


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def ask(url: str, client: openai.OpenAI, endpoint: str, stream: bool, case: tuple[str, str], max_tokens: int,
        stop: list[str] | None) -> tuple[str, str]:  # fmt: skip
    """(text, finish_reason) of a greedy request, the way each endpoint's users read it."""
    model, prompt = case[0], PROMPTS[case[1]]
    common = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stop": stop}
    if endpoint == "completions":
        if not stream:
            choice = client.completions.create(prompt=prompt, **common).choices[0]
            return choice.text, choice.finish_reason
        chunks = [c.choices[0] for c in client.completions.create(prompt=prompt, stream=True, **common) if c.choices]
        return "".join(c.text for c in chunks), chunks[-1].finish_reason
    if endpoint == "chat":
        messages = [{"role": "user", "content": prompt}]
        if not stream:
            choice = client.chat.completions.create(messages=messages, **common).choices[0]
            return choice.message.content, choice.finish_reason
        chunks = [c.choices[0] for c in client.chat.completions.create(messages=messages, stream=True, **common)
                  if c.choices]  # fmt: skip
        return "".join(c.delta.content or "" for c in chunks), chunks[-1].finish_reason
    body = {"prompt": prompt, "mix": model, "max_tokens": max_tokens, "stop": stop, "stream": stream}
    if not stream:
        r = httpx.post(url + "/generate", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["text"], r.json()["finish_reason"]
    events = []
    with httpx.stream("POST", url + "/generate", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    return "".join(e["text"] for e in events), events[-1]["finish_reason"]


@pytest.fixture(scope="module")
def reference(url, client):
    """Each case's answer without a stop list: it ends on EOS ("stop") inside 48 tokens."""
    out = {}
    for case in CASES:
        text, finish = ask(url, client, "generate", False, case, 48, None)
        assert finish == "stop" and len(text) > 20, (case, text, finish)
        out[case] = text
    return out


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_a_stop_list_that_never_matches_keeps_the_end_of_an_answer_that_ends_on_eos(url, client, reference,
                                                                                    endpoint, stream):  # fmt: skip
    for case, ref in reference.items():
        assert ask(url, client, endpoint, stream, case, 48, NEVER) == (ref, "stop"), case
        assert ask(url, client, endpoint, stream, case, 48, None) == (ref, "stop"), case


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_max_tokens_and_a_matched_stop_string_end_where_they_should(url, client, reference, endpoint, stream):
    case = ("all-tasks", "sql")
    ref = reference[case]
    # Ended by max_tokens, with and without a stop list: the same prefix of the answer.
    short = ask(url, client, endpoint, stream, case, 6, None)
    assert short[1] == "length" and ref.startswith(short[0]) and 0 < len(short[0]) < len(ref)
    assert ask(url, client, endpoint, stream, case, 6, NEVER) == short
    # Ended by a stop string inside the answer (and spanning tokens): the text up to it, without it.
    for stop in (" FROM", "koda", "WHERE author"):
        assert stop in ref
        assert ask(url, client, endpoint, stream, case, 48, [*NEVER, stop]) == (ref[: ref.index(stop)], "stop")
    # The earliest of several matching stop strings wins, whatever their order in the list.
    assert ask(url, client, endpoint, stream, case, 48, ["pages", "SUM"]) == (ref[: ref.index("SUM")], "stop")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stops=st.lists(st.text(alphabet="abcdeklmnopsuwxyzSELCTFROMW '=()_\n", min_size=1, max_size=16), min_size=1,
                      max_size=4), stream=st.booleans(), case=st.sampled_from(CASES))  # fmt: skip
def test_property_a_stop_list_that_never_matches_changes_nothing(url, client, reference, stops, stream, case):
    ref = reference[case]
    assume(not any(s in ref for s in stops))
    assert ask(url, client, "generate", stream, case, 48, stops) == (ref, "stop")
