"""The OpenAI response shapes of choices and logprobs, from what the engine sends back.

Completions logprobs are the legacy shape (``tokens``, ``token_logprobs``, ``top_logprobs``,
``text_offset``); chat logprobs are ``{"content": [{token, logprob, bytes, top_logprobs}]}``. A token's
string is its own decoding (special tokens included: an ending EOS shows as itself); a logprob of
``-inf`` (a token a grammar or a top-k cut removed) is written ``-9999.0``, as vLLM does (JSON has no
infinity).
"""

from __future__ import annotations

import math

from server.engine.sequence import TokenLogprob

FLOOR = -9999.0


class TokenStrings:
    """Token id -> its text, decoded once per token (the server's tokenizer)."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer, self._cache = tokenizer, {}

    def __call__(self, token: int) -> str:
        text = self._cache.get(token)
        if text is None:
            text = self._cache[token] = self._tokenizer.decode([token], skip_special_tokens=False)
        return text


def _lp(value: float) -> float:
    return value if math.isfinite(value) else FLOOR


def completion_logprobs(entries: list[TokenLogprob | None], strings: TokenStrings, offset: int = 0) -> dict:
    """``entries`` (None: a first prompt token, which has no logprob) in the completions shape;
    ``text_offset`` counts from ``offset``."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        if e is None:  # the first prompt token: its text, no logprob
            continue
        text = strings(e.token)
        out["tokens"].append(text)
        out["token_logprobs"].append(_lp(e.logprob))
        top = {strings(t): _lp(v) for t, v in e.top} if e.top else {text: _lp(e.logprob)}
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def echo_logprobs(prompt_ids: list[int], prompt: list[TokenLogprob | None], generated: list[TokenLogprob],
                  strings: TokenStrings) -> dict:  # fmt: skip
    """Echo: the prompt's tokens (the first with ``None``), then the generated ones."""
    first = strings(prompt_ids[0])
    rest = completion_logprobs([e for e in prompt if e is not None] + generated, strings, len(first))
    return {"tokens": [first] + rest["tokens"], "token_logprobs": [None] + rest["token_logprobs"],
            "top_logprobs": [None] + rest["top_logprobs"], "text_offset": [0] + rest["text_offset"]}  # fmt: skip


def chat_logprobs(entries: list[TokenLogprob], strings: TokenStrings, top: int) -> dict:
    def item(token: int, value: float) -> dict:
        text = strings(token)
        return {"token": text, "logprob": _lp(value), "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(e.token, e.logprob), "top_logprobs": [item(t, v) for t, v in e.top[:top]]}
                        for e in entries]}  # fmt: skip


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish(reason: str | None) -> str | None:
    return "stop" if reason == "abort" else reason
