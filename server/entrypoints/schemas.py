"""Request and response bodies: the OpenAI shapes mixserve serves, plus its native and admin ones.

Unknown fields are accepted and ignored where OpenAI clients send extras; fields mixserve cannot
honour (``n > 1``, ``logprobs``) are refused with a message rather than silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MixField = dict[str, Any] | str | None
StopField = str | list[str] | None


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=1, description="only n=1 is supported")
    stop: StopField = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    logprobs: Any = Field(None, description="not supported: must be null or false")
    mix: MixField = Field(None, description="an ad-hoc mix (MixSpec JSON) or the name of an adapter or pinned mix")
    ignore_eos: bool = False


class CompletionRequest(_Sampling):
    model: str
    prompt: str | list[str] | list[int]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(
                p["text"] for p in self.content if p.get("type") == "text" and isinstance(p.get("text"), str)
            )
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class GenerateRequest(BaseModel):
    """``POST /generate``: mixserve's native request (greedy by default)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    mix: MixField = None
    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: StopField = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    ignore_eos: bool = False


class RegisterAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    path: str = Field(description="a directory under the adapter root (relative to it, or absolute inside it)")
    replace: bool = False


class PinMixRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    mix: dict[str, Any] | str | None = Field(None, description="a MixSpec, or an adapter / pinned mix name")
    mergekit: str | dict[str, Any] | None = Field(
        None,
        description="instead of mix: a mergekit YAML config (text or object) over the served base and its "
        "adapters, merged with mergekit 0.1.5's conventions",
    )
    space: Literal["dense", "lowrank"] | None = Field(
        None, description="mergekit: the merge space (default: lowrank for linear / task_arithmetic, else dense)"
    )
    pin: bool = True

    @model_validator(mode="after")
    def _one_source(self) -> PinMixRequest:
        if (self.mix is None) == (self.mergekit is None):
            raise ValueError("give exactly one of 'mix' (a MixSpec) and 'mergekit' (a mergekit config)")
        if self.space is not None and self.mergekit is None:
            raise ValueError("'space' goes with 'mergekit' (a MixSpec names its own)")
        return self


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    """The OpenAI error shape, used on every endpoint."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
