"""What real clients send, honoured or refused by name (issue 35): token-id prompts, echo and logprobs
(lm-eval's loglikelihood requests), n and best_of, sampling parameters, structured outputs, model cards.
A real server (uvicorn on 127.0.0.1) and the official ``openai`` client."""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import math
import re
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
import torch

from server.config import ServeConfig
from tests.server_harness import running_server

DEMO = Path(__file__).resolve().parents[1] / "mixserve" / "demo"
pytestmark = pytest.mark.skipif(not (DEMO / "base" / "model.safetensors").is_file(), reason="mixserve/demo not trained")
SQL = ("### task: sql\n### input: CREATE TABLE books (title TEXT, author TEXT, year INT, pages INT) ; "
       "how many books have author bemi\n### output:\n")  # fmt: skip
JSON = "### task: json\n### input: meet pudo, a pifu aged 37 from boto.\n### output:\n"
RECORD = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
          "city": {"type": "string"}, "job": {"type": "string"}}, "required": ["name", "age", "city", "job"]}  # fmt: skip


@pytest.fixture(scope="module")
def server():
    config = ServeConfig(model=DEMO / "base", adapters=DEMO / "adapters", max_batch=16)
    with running_server(config, extensions=[]) as (url, app):
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


def post(url: str, body: dict, path: str = "/v1/completions") -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=120)


def ids_of(app, text: str) -> list[int]:
    return app.state.server.runtime.tokenizer(text)["input_ids"]


# ----------------------------------------------------------------------------- prompts and echo
def test_token_id_prompts_in_every_shape_give_the_text_prompts_answer(server, client):
    url, app = server
    ids = ids_of(app, SQL)
    by_text = client.completions.create(model="sql", prompt=SQL, max_tokens=12, temperature=0).choices[0].text
    assert by_text.startswith("SELECT")
    assert client.completions.create(model="sql", prompt=ids, max_tokens=12, temperature=0).choices[0].text == by_text
    two = client.completions.create(model="sql", prompt=[ids, ids_of(app, JSON)], max_tokens=12, temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == by_text
    strings = client.completions.create(model="sql", prompt=[SQL, SQL], max_tokens=12, temperature=0, n=2)
    assert [c.index for c in strings.choices] == [0, 1, 2, 3]
    assert all(c.text == by_text for c in strings.choices)
    assert strings.usage.prompt_tokens == 2 * len(ids) and strings.usage.completion_tokens == 4 * 12
    # lm-eval's generate_until request: token ids, its stop list and a seed.
    until = client.completions.create(model="sql", prompt=[ids], max_tokens=32, temperature=0, seed=1234,
                                      stop=["\n\n", "<eos>", "### task"])  # fmt: skip
    text = until.choices[0].text
    assert text.startswith(by_text) or by_text.startswith(text)
    r = post(url, {"model": "sql", "prompt": [[1, 2], [10**9]]})
    assert (
        r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "token ids" in r.json()["error"]["message"]
    )
    r = post(url, {"model": "sql", "prompt": [["a"]]})
    assert r.status_code == 400 and "list of lists of token ids" in r.json()["error"]["message"]


def test_echo_logprobs_are_the_models_loglikelihoods(server):
    """lm-eval's loglikelihood request, against the model's own log-softmax (transformers, fp32)."""
    from transformers import AutoModelForCausalLM

    url, app = server
    ids = ids_of(app, JSON) + ids_of(app, '{"name": "pudo"')[1:]
    body = {"model": "mixserve-demo", "prompt": [ids], "max_tokens": 1, "echo": True, "logprobs": 1,
            "temperature": 0, "seed": 1234}  # fmt: skip
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    choice = client.completions.create(**body).model_dump()["choices"][0]  # exactly what lm-eval sends
    lp = choice["logprobs"]
    assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
    hf = AutoModelForCausalLM.from_pretrained(DEMO / "base", dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    expected = [float(ref[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert max(abs(a - b) for a, b in zip(lp["token_logprobs"][1 : len(ids)], expected, strict=True)) < 1e-4
    for i in range(1, len(ids)):  # the top-1 is the argmax of the same distribution
        ((_tok, value),) = lp["top_logprobs"][i].items()
        assert math.isclose(value, float(ref[i - 1].max()), abs_tol=1e-4)
    assert choice["text"].startswith(app.state.server.runtime.tokenizer.decode(ids))
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    # Streamed, the prompt comes first (with its logprobs), then the completion's tokens.
    chunks = list(client.completions.create(**{**body, "max_tokens": 3}, stream=True))
    text = "".join(ch.text for c in chunks for ch in c.choices)
    streamed = [v for c in chunks for ch in c.choices if ch.logprobs for v in ch.logprobs.token_logprobs]
    whole = client.completions.create(**{**body, "max_tokens": 3}).choices[0]
    assert text == whole.text and streamed == pytest.approx(whole.logprobs.token_logprobs, abs=1e-6)
    plain = list(client.completions.create(**{**body, "max_tokens": 3, "logprobs": None}, stream=True))
    assert "".join(ch.text for c in plain for ch in c.choices) == whole.text
    # max_tokens 0 with echo: the prompt's logprobs only, for every choice.
    zero = post(url, {**body, "max_tokens": 0, "n": 2}).json()
    assert [c["logprobs"]["token_logprobs"] for c in zero["choices"]] == [lp["token_logprobs"][:-1]] * 2
    assert zero["usage"]["completion_tokens"] == 0
    r = post(url, {**body, "max_tokens": 0, "echo": False})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_generated_logprobs_streamed_and_not_in_both_shapes(server, client):
    _url, _app = server
    full = client.completions.create(model="json", prompt=JSON, max_tokens=10, temperature=0, logprobs=3)
    lp = full.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 10
    assert "".join(lp.tokens) == full.choices[0].text
    for value, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and math.isclose(value, max(top.values()), abs_tol=1e-6)  # greedy: the best
    streamed = list(client.completions.create(model="json", prompt=JSON, max_tokens=10, temperature=0, logprobs=3,
                                              stream=True))  # fmt: skip
    tokens = [t for c in streamed for ch in c.choices if ch.logprobs for t in ch.logprobs.tokens]
    values = [v for c in streamed for ch in c.choices if ch.logprobs for v in ch.logprobs.token_logprobs]
    assert tokens == lp.tokens and values == pytest.approx(lp.token_logprobs, abs=1e-6)
    chat = client.chat.completions.create(model="json", messages=[{"role": "user", "content": JSON}], max_tokens=6,
                                          temperature=0, logprobs=True, top_logprobs=2)  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) == 6 and all(len(c.top_logprobs) == 2 for c in content)
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    assert content[0].logprob == pytest.approx(lp.token_logprobs[0], abs=1e-5)
    assert bytes(content[0].bytes).decode() == content[0].token


# ----------------------------------------------------------------------------------- n, best_of
def test_n_choices_share_one_prefill_and_seeds_hold_per_choice(server, client):
    _url, app = server
    runtime = app.state.server.runtime
    seen: list[int] = []
    original = runtime.prefill_positions

    def counting(chunks, every=()):
        seen.extend(len(c.ids) for c in chunks)
        return original(chunks, every)

    runtime.prefill_positions = counting
    try:
        out = client.completions.create(model="json", prompt=JSON, max_tokens=12, temperature=2.0, n=4, seed=7)
    finally:
        runtime.prefill_positions = original
    assert sum(seen) == len(ids_of(app, JSON))  # one prefill for the four choices
    texts = [c.text for c in out.choices]
    assert [c.index for c in out.choices] == [0, 1, 2, 3] and len(set(texts)) > 1
    again = client.completions.create(model="json", prompt=JSON, max_tokens=12, temperature=2.0, n=4, seed=7)
    assert [c.text for c in again.choices] == texts
    # Choice i is the request with seed + i, whatever else runs beside it.
    with cf.ThreadPoolExecutor(6) as pool:
        noise = [pool.submit(client.completions.create, model="sql", prompt=SQL, max_tokens=20, temperature=0.8)
                 for _ in range(5)]  # fmt: skip
        alone = client.completions.create(model="json", prompt=JSON, max_tokens=12, temperature=2.0, seed=9)
        [f.result() for f in noise]
    assert alone.choices[0].text == texts[2]
    kv = runtime.kv
    assert kv.free_blocks == kv.usable_blocks  # every shared and copied block came back


def test_best_of_returns_the_most_likely_choices_and_streams_n(server, client):
    url, _ = server
    best = client.completions.create(model="json", prompt=JSON, max_tokens=8, temperature=1.0, n=1, best_of=3, seed=3)
    assert len(best.choices) == 1 and best.choices[0].logprobs is None
    with_lp = client.completions.create(model="json", prompt=JSON, max_tokens=8, temperature=1.0, n=3, seed=3,
                                        logprobs=0)  # fmt: skip
    means = {c.text: sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in with_lp.choices}
    assert best.choices[0].text == max(means, key=means.get)
    assert post(url, {"model": "json", "prompt": "x", "n": 3, "best_of": 2}).status_code == 400
    assert post(url, {"model": "json", "prompt": "x", "best_of": 2, "stream": True}).status_code == 400
    chunks = list(client.completions.create(model="json", prompt=JSON, max_tokens=8, temperature=0, n=2, stream=True))
    text = {0: "", 1: ""}
    for c in chunks:
        for ch in c.choices:
            text[ch.index] += ch.text
    assert text[0] == text[1] and text[0]


# ---------------------------------------------------------------------------- sampling parameters
def test_logit_bias_and_stop_token_ids_change_the_output_as_asked(server, client):
    _, app = server
    eos = app.state.server.runtime.tokenizer.eos_token_id
    plain = client.completions.create(model="json", prompt=JSON, max_tokens=60, temperature=0)
    assert plain.choices[0].finish_reason == "stop"  # ends on EOS
    no_eos = client.completions.create(
        model="json", prompt=JSON, max_tokens=60, temperature=0, logit_bias={str(eos): -100}
    )
    assert no_eos.choices[0].finish_reason == "length" and no_eos.choices[0].text.startswith(plain.choices[0].text)
    x = ids_of(app, "x")[-1]
    forced = client.completions.create(model="json", prompt=JSON, max_tokens=5, temperature=0, logit_bias={str(x): 100})
    assert forced.choices[0].text == "x" * 5
    first = client.completions.create(model="json", prompt=JSON, max_tokens=3, temperature=0, logprobs=0)
    third = ids_of(app, first.choices[0].text)  # the first tokens greedy writes
    stop_at = app.state.server.runtime.tokenizer.convert_tokens_to_ids(
        app.state.server.runtime.tokenizer.tokenize(first.choices[0].text)
    )[1]
    stopped = client.completions.create(model="json", prompt=JSON, max_tokens=20, temperature=0,
                                        extra_body={"stop_token_ids": [stop_at]})  # fmt: skip
    assert stopped.choices[0].finish_reason == "stop" and len(third) >= 1
    assert plain.choices[0].text.startswith(stopped.choices[0].text) and len(stopped.choices[0].text) < 6


def test_penalties_top_k_min_p_are_applied_not_ignored(server, client):
    kw = {"model": "json", "prompt": JSON, "max_tokens": 30, "temperature": 0}
    plain = client.completions.create(**kw).choices[0].text
    penalized = client.completions.create(**kw, frequency_penalty=2.0, presence_penalty=2.0).choices[0].text
    assert penalized != plain
    repeated = client.completions.create(**kw, extra_body={"repetition_penalty": 3.0}).choices[0].text
    assert repeated != plain
    # top_k 1 is greedy whatever the temperature; min_p 1 keeps only the most likely token.
    assert client.completions.create(**{**kw, "temperature": 1.5}, extra_body={"top_k": 1}).choices[0].text == plain
    assert client.completions.create(**{**kw, "temperature": 1.5}, extra_body={"min_p": 1.0}).choices[0].text == plain


# ----------------------------------------------------------------------------- structured outputs
def test_json_schema_outputs_are_valid_and_mixed_with_free_rows_of_other_mixes(server, client):
    schema = {"type": "json_schema", "json_schema": {"name": "record", "schema": RECORD, "strict": True}}
    free = client.completions.create(model="sql", prompt=SQL, max_tokens=30, temperature=0).choices[0].text
    with cf.ThreadPoolExecutor(8) as pool:
        constrained = [pool.submit(client.chat.completions.create, model=m, messages=[{"role": "user", "content": p}],
                                   max_tokens=60, temperature=0, response_format=schema)
                       for m, p in (("json", JSON), ("sql", SQL), ("json", SQL), ("mixserve-demo", JSON))]  # fmt: skip
        frees = [pool.submit(client.completions.create, model="sql", prompt=SQL, max_tokens=30, temperature=0)
                 for _ in range(4)]  # fmt: skip
        outs = [f.result().choices[0].message.content for f in constrained]
        assert all(f.result().choices[0].text == free for f in frees)  # free rows unchanged beside grammars
    for text in outs:
        jsonschema.validate(json.loads(text), RECORD)  # even on the SQL prompt: valid JSON of the schema
    structured = server[1].state.server.engine.structured
    compiles = structured.compiles
    client.completions.create(
        model="json", prompt=JSON, max_tokens=60, temperature=0, extra_body={"response_format": schema}
    )
    assert structured.compiles == compiles  # compiled once, cached by spec
    assert json.loads(outs[0]) == {"name": "pudo", "age": 37, "city": "boto", "job": "pifu"}


def test_json_object_regex_choice_and_grammar(server, client):
    _url, _ = server
    obj = client.completions.create(model="sql", prompt=SQL, max_tokens=40, temperature=0,
                                    extra_body={"response_format": {"type": "json_object"}})  # fmt: skip
    assert obj.choices[0].finish_reason == "stop" and isinstance(json.loads(obj.choices[0].text), dict)
    regex = client.completions.create(model="sql", prompt=SQL, max_tokens=20, temperature=0,
                                      extra_body={"guided_regex": "SELECT [A-Z]+\\(\\*\\)"})  # fmt: skip
    assert re.fullmatch(r"SELECT [A-Z]+\(\*\)", regex.choices[0].text)
    choice = client.completions.create(model="sql", prompt=SQL, max_tokens=20, temperature=0,
                                       extra_body={"structured_outputs": {"choice": ["yes", "no", "SELECT 1"]}})  # fmt: skip
    assert choice.choices[0].text in ("yes", "no", "SELECT 1")
    ebnf = client.completions.create(model="sql", prompt=SQL, max_tokens=20, temperature=0,
                                     extra_body={"guided_grammar": 'root ::= "SELECT " [a-z]+'})  # fmt: skip
    assert re.fullmatch(r"SELECT [a-z]+", ebnf.choices[0].text)


def test_unsupported_constraints_and_fields_are_refused_by_name(server, caplog):
    url, _ = server
    caplog.set_level(logging.INFO, logger="mixserve.api")
    cases = [
        ({"guided_json": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}}, "guided_json", "uniqueItems"),
        ({"guided_regex": "("}, "guided_regex", "does not compile"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "one output constraint"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
        ({"suffix": "after"}, "suffix", "fill-in-the-middle"),
        ({"made_up_field": 1}, "made_up_field", "unknown field"),
        ({"logprobs": 21}, "logprobs", "20"),
        ({"logit_bias": {"99999": 1}}, "logit_bias", "token ids"),
        ({"ignore_eos": True, "response_format": {"type": "json_object"}}, "ignore_eos", "grammar"),
    ]  # fmt: skip
    for extra, param, words in cases:
        r = post(url, {"model": "sql", "prompt": "SECRET PROMPT TEXT", "max_tokens": 4, **extra})
        assert r.status_code == 400, extra
        err = r.json()["error"]
        assert param in (err["param"] or "") + err["message"] and words in err["message"], (extra, err)
    r = post(url, {"model": "sql", "messages": [{"role": "user", "content": "hi"}],
                   "tools": [{"type": "function", "function": {"name": "f"}}]}, "/v1/chat/completions")  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    refused = [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("refused")]
    assert len(refused) >= len(cases) and not any("SECRET" in m for m in refused)
    assert any("made_up_field" in m for m in refused)


def test_model_cards_give_the_context(server, client):
    url, app = server
    context = app.state.server.runtime.max_len
    cards = {m.id: m for m in client.models.list().data}
    assert all(m.model_extra["max_model_len"] == context for m in cards.values())
    one = client.models.retrieve("sql")
    assert one.id == "sql" and one.model_extra["max_model_len"] == context
    assert httpx.get(url + "/v1/models/nope").status_code == 404


def test_guidellms_requests_stream_with_usage_in_every_chunk(server):
    """The bodies guidellm 0.8.1 sends (captured from it): vLLM's continuous_usage_stats included."""
    url, _ = server
    options = {"include_usage": True, "continuous_usage_stats": True}
    bodies = [("/v1/completions", {"model": "sql", "stream": True, "stream_options": options, "max_tokens": 8,
                                   "ignore_eos": True, "prompt": SQL}),
              ("/v1/chat/completions", {"model": "sql", "stream": True, "stream_options": options,
                                        "max_completion_tokens": 8, "ignore_eos": True,
                                        "messages": [{"role": "user", "content": [{"type": "text", "text": SQL}]}]})]  # fmt: skip
    for path, body in bodies:
        with httpx.stream("POST", url + path, json=body, timeout=60) as r:
            assert r.status_code == 200
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        counts = [c["usage"]["completion_tokens"] for c in chunks]
        assert counts == sorted(counts) and counts[-1] == 8 and all("usage" in c for c in chunks)
    r = post(url, {"model": "sql", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]}, "/v1/chat/completions")  # fmt: skip
    assert r.status_code == 400 and "image_url" in r.json()["error"]["message"]
    r = post(url, {"model": "sql", "messages": [{"role": "assistant", "content": "x", "tool_calls": []}]},
             "/v1/chat/completions")  # fmt: skip
    assert r.status_code == 400 and "tool_calls" in r.json()["error"]["message"]


def test_echo_logprobs_of_a_prompt_prefilled_in_chunks_are_the_same(server):
    """A prompt longer than --max-prefill-tokens goes in chunks: each chunk's positions give their share of
    the prompt's logprobs, and they join into the one-chunk answer."""
    config = ServeConfig(model=DEMO / "base", adapters=DEMO / "adapters", max_batch=4, max_prefill_tokens=7)
    body = {"model": "json", "prompt": JSON, "max_tokens": 2, "echo": True, "logprobs": 2, "temperature": 0}
    with running_server(config, extensions=[]) as (url, _):
        chunked = post(url, body).json()["choices"][0]
    whole = openai.OpenAI(base_url=server[0] + "/v1", api_key="unused").completions.create(**body).choices[0]
    assert chunked["text"] == whole.text
    assert chunked["logprobs"]["tokens"] == whole.logprobs.tokens
    # Chunks attend in other shapes than one pass, so fp32 sums differ in order: up to 7e-6 here, 1.0e-5
    # under the second kernel set (MKL SSE4_2, ATen default; measured). A chunk's positions joined out of
    # place would be off by whole nats.
    assert chunked["logprobs"]["token_logprobs"] == pytest.approx(whole.logprobs.token_logprobs, abs=1e-4)
