"""Request and response bodies: the OpenAI shapes mixserve serves, plus its native and admin ones.

Every field of the OpenAI requests is either honoured or refused: an unknown field is a 400 that
names it (``extra="forbid"``), and a known one mixserve cannot honour (``suffix``, ``tools``) is
refused by the route with a sentence. ``user`` is accepted and has no effect (OpenAI's abuse
tracking). The README's endpoint table lists them all.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MixField = dict[str, Any] | str | None
StopField = str | list[str] | None
MAX_CHOICES = 16  # n, best_of, and choices per request (prompts x n)
PromptList = list[str | list[int]]


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field("response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: ``text``, ``json_object`` or ``json_schema``."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("type 'json_schema' needs json_schema.schema")
        return self


class StructuredOutputsParams(BaseModel):
    """vLLM's ``structured_outputs`` extra: exactly one constraint."""

    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | str | None = Field(None, alias="json")
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1, max_length=256)
    grammar: str | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage so far in every chunk (guidellm sends it)


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="-1 or 0: off")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    logit_bias: dict[str, float] | None = Field(None, max_length=1024)
    stop: StopField = None
    stop_token_ids: list[int] | None = Field(None, max_length=64)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    mix: MixField = Field(None, description="an ad-hoc mix (MixSpec JSON) or the name of an adapter or pinned mix")
    ignore_eos: bool = False
    user: str | None = Field(None, max_length=256, description="accepted; no effect")
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsParams | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1, max_length=256)
    guided_grammar: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys are token ids, got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values are in [-100, 100], got {bias} for token {key}")
        return value


class CompletionRequest(_Sampling):
    prompt: Any
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: Any) -> PromptList:
        """One list of prompts: each a string or a list of token ids (OpenAI's four shapes)."""
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and value:
            if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
                return [list(value)]
            if all(isinstance(p, str) for p in value):
                return list(value)
            if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
                   for p in value):  # fmt: skip
                return [list(p) for p in value]
        raise ValueError("prompt must be a string, a list of strings, a list of token ids or a list of lists of "
                         "token ids (none empty)")  # fmt: skip


class ChatMessage(BaseModel):
    """A chat message: text content only (a list's ``text`` parts joined); image, audio, file parts and
    tool-call transcripts are refused by name (the served models read text, and mixserve has no tools)."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = Field(None, max_length=64, description="passed to the model's chat template")

    @field_validator("content")
    @classmethod
    def _text_only(cls, value: str | list[dict[str, Any]] | None) -> str | list[dict[str, Any]] | None:
        for part in value if isinstance(value, list) else []:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content parts of type {part.get('type')!r} are not supported (text only)")
        return value

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p["text"] for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    max_tokens: int | None = Field(None, ge=1)


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
