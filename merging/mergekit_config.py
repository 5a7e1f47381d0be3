"""A mergekit YAML config (as a dict) -> the MixSpec that merges what mergekit 0.1.5 would.

mergekit's config names models; mixserve merges LoRA adapters of one base. A model is an adapter when it
is mergekit's LoRA syntax ``BASE+ADAPTER``, a registered adapter's name or an adapter directory; the base
model itself is allowed (mergekit skips it in its task-arithmetic methods; in ``linear`` it is a model
with a zero delta). Whatever names those is the caller's (``Resolver``): the CLI looks at paths and
``--adapter`` names, the server at its registry and adapter root.

The result is one node with ``convention: mergekit`` (``merging/mergekit.py``): mergekit's per-model
``weight`` / ``density`` / ``gamma`` / ``epsilon`` on the leaves, its shared ``normalize`` / ``rescale`` /
``lambda`` on the node, mergekit's defaults for what is not given. Its space is ``lowrank`` for
``linear`` and ``task_arithmetic`` (exact there, and servable at the adapters' own rank) and ``dense``
for the rest (what mergekit computes: trims and draws on full matrices), unless the caller overrides it.

What mixserve cannot honour is refused in one sentence naming the field: layer ``slices`` and ``modules``
(frankenmerges), ``passthrough`` and the methods outside mergekit's generalized task arithmetic,
tokenizer surgery, per-layer gradients and per-tensor filters, and models that are no LoRA adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from merging import mergekit
from merging.spec import PER_CHILD, AdapterLeaf, MixNode

# A model reference -> an adapter name, or None for the base model; raises MergekitConfigError (a
# sentence, without the field: the translator names it) when the reference is neither.
Resolver = Callable[[str], str | None]
FIELDS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
          "tokenizer", "chat_template", "slices", "modules", "name")  # fmt: skip
SHARED = ("normalize", "rescale", "lambda", "int8_mask")
DTYPES = ("float32", "float64", "bfloat16", "float16")


def lora_resolver(is_base: Callable[[str], bool], adapter: Callable[[str], str], base_label: str) -> Resolver:
    """A :data:`Resolver` from the caller's two questions: is this reference the base model, and which adapter
    does it name (raising :class:`MergekitConfigError` if none). It splits mergekit's LoRA syntax
    ``BASE+ADAPTER``, whose part before ``+`` must be the base (``base_label`` names it in the error)."""

    def resolve(ref: str) -> str | None:
        if is_base(ref):
            return None
        model, plus, lora = ref.partition("+")
        if plus:
            if not is_base(model):
                raise MergekitConfigError(f"{model!r} (before '+') is not the base model {base_label}".rstrip())
            return adapter(lora)
        return adapter(ref)

    return resolve


class MergekitConfigError(ValueError):
    """A config mixserve cannot honour, in one sentence that names the field."""


@dataclass
class MergekitMix:
    """A translated config: the mix, the dtype the config merges in, and what was accepted without effect."""

    mix: MixNode
    dtype: str | None = None
    notes: list[str] = field(default_factory=list)


def _fail(where: str, message: str) -> MergekitConfigError:
    return MergekitConfigError(f"{where}: {message}")


def _scalar(where: str, value: Any, kind: type) -> Any:
    """A parameter's value: one number (or bool); gradients and filters refused."""
    if isinstance(value, list):
        if value and all(isinstance(v, dict) for v in value):
            raise _fail(where, "per-tensor filters are not supported; give one value")
        raise _fail(where, "per-layer gradients (lists) are not supported; give one value")
    if isinstance(value, dict):
        raise _fail(where, "per-tensor filters are not supported; give one value")
    if kind is bool:
        if not isinstance(value, bool):
            raise _fail(where, f"must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(where, f"must be a number, got {value!r}")
    return float(value)


def _reference(where: str, value: Any) -> str:
    """A model reference as mergekit writes it: ``path``, ``path+lora``, or its mapping form."""
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, dict) and isinstance(value.get("model"), dict) and "path" in value["model"]:
        base = str(value["model"]["path"])
        lora = value.get("lora")
        return f"{base}+{lora['path']}" if isinstance(lora, dict) and "path" in lora else base
    raise _fail(where, f"must name a model (a path, or BASE+ADAPTER), got {value!r}")


def from_mergekit(config: Any, resolve: Resolver, *, space: str | None = None) -> MergekitMix:
    """Translate a parsed mergekit config; raises :class:`MergekitConfigError` naming the field at fault."""
    if not isinstance(config, Mapping):
        raise MergekitConfigError("a mergekit config is a YAML mapping (merge_method, base_model, models, ...)")
    unknown = [k for k in config if k not in FIELDS]
    if unknown:
        raise _fail(str(unknown[0]), f"not a mergekit 0.1.5 config field (known: {', '.join(FIELDS[:-1])})")
    for key, why in (("slices", "layer slices (frankenmerges) are not supported: mixserve merges adapters' deltas "
                      "into one base model; list them under models"),
                     ("modules", "per-module merges are not supported; list the adapters under models"),
                     ("tokenizer", "tokenizer surgery is not supported: mixserve serves the base model's tokenizer"),
                     ("chat_template", "mixserve serves the base model's chat template")):  # fmt: skip
        if config.get(key) is not None:
            raise _fail(key, why)
    if config.get("tokenizer_source") not in (None, "base"):
        raise _fail(
            "tokenizer_source", "tokenizer surgery is not supported: mixserve serves the base model's tokenizer"
        )
    method = config.get("merge_method")
    if method not in mergekit.DEFAULTS:
        if method == "passthrough":
            raise _fail("merge_method", "passthrough stacks models' layers; there is no delta to merge or serve")
        raise _fail("merge_method", f"{method!r} is not supported; mixserve honours {', '.join(mergekit.DEFAULTS)}")
    notes: list[str] = []
    base = config.get("base_model")
    if base is not None:
        ref = _reference("base_model", base)
        try:
            if resolve(ref) is not None:
                raise MergekitConfigError(f"{ref!r} is an adapter, not the base model")
        except MergekitConfigError as exc:
            raise _fail("base_model", str(exc)) from None
    elif method != "linear":
        raise _fail("base_model", f"{method} merges deltas from the base model: give base_model (mergekit needs it)")
    declared = set(mergekit.params_of(method)) - {"seed"}
    per_model = {"weight", *(k for k in PER_CHILD if k in declared)}
    shared = {k for k in SHARED if k in declared or k == "int8_mask"}
    top = _parameters("parameters", config.get("parameters"), method, per_model | shared)
    if "int8_mask" in top:
        notes.append("parameters.int8_mask: the mask's dtype changes no value; ignored")
        del top["int8_mask"]
    dtype = config.get("dtype")
    for key in ("dtype", "out_dtype"):
        value = config.get(key)
        if value is not None and value not in DTYPES:
            raise _fail(key, f"{value!r} is not one of {', '.join(DTYPES)}")
    if dtype in ("bfloat16", "float16"):
        notes.append(f"dtype: {dtype}: mixserve merges in float32 (more precise than mergekit's {dtype} merge)")
    if config.get("out_dtype") is not None:
        notes.append("out_dtype: a full model is written in the base model's dtype, a PEFT adapter in float32")

    models = config.get("models")
    if not isinstance(models, list) or not models:
        raise _fail("models", "list the adapters to merge (model: BASE+ADAPTER, an adapter's name or directory)")
    leaves: list[AdapterLeaf] = []
    base_weight, base_listed = 0.0, False
    for i, entry in enumerate(models):
        where = f"models[{i}]"
        if not isinstance(entry, Mapping) or "model" not in entry:
            raise _fail(where, "each model is a mapping with a 'model' field")
        extra = [k for k in entry if k not in ("model", "parameters")]
        if extra:
            raise _fail(f"{where}.{extra[0]}", "not a field of a model entry (model, parameters)")
        ref = _reference(f"{where}.model", entry["model"])
        try:
            name = resolve(ref)
        except MergekitConfigError as exc:
            raise _fail(f"{where}.model", str(exc)) from None
        own = _parameters(f"{where}.parameters", entry.get("parameters"), method, per_model | shared)
        misplaced = [k for k in own if k in shared]
        if misplaced:
            raise _fail(f"{where}.parameters.{misplaced[0]}", "applies to the whole merge: give it under parameters")
        values = {**{k: v for k, v in top.items() if k in per_model}, **own}
        if name is None:  # the base model: skipped by mergekit's task arithmetic, a zero delta in linear
            if method == "linear":
                base_weight, base_listed = base_weight + _weight(where, values), True
            continue
        child = {k: values[k] for k in PER_CHILD if k in values}
        leaves.append(AdapterLeaf(adapter=name, weight=_weight(where, values), **child))
    if not leaves:
        raise _fail("models", "no adapter to merge (every model is the base model)")
    node: dict[str, Any] = {k: v for k, v in top.items() if k in shared}
    if method == "linear" and base is not None and not base_listed:
        # mergekit's linear takes base_model as one more input, weighted by parameters.weight.
        if "weight" not in top:
            raise _fail("base_model", "linear merges the base model as one more model: give it a weight "
                        "(parameters.weight) or leave base_model out")  # fmt: skip
        base_weight = top["weight"]
    if method == "linear":
        total = sum(leaf.weight for leaf in leaves) + base_weight
        if not node.get("normalize", True) and abs(total - 1.0) > 1e-6:
            raise _fail("parameters.normalize", f"linear without normalize scales the base model's own weights by "
                        f"the weights' sum ({total:g}); only a sum of 1 is a merge of deltas (or use task_arithmetic)")  # fmt: skip
        if base_weight:  # sum_i w_i theta_i / W over the base and adapters = sum_i (w_i / W) dW_i
            scale = 1.0 / total if node.get("normalize", True) else 1.0
            leaves = [leaf.model_copy(update={"weight": leaf.weight * scale}) for leaf in leaves]
            node["normalize"] = False
    try:
        mix = MixNode(method=method, convention="mergekit", children=leaves,
                      space=space or ("lowrank" if method in ("linear", "task_arithmetic") else "dense"),
                      **{("lambda_" if k == "lambda" else k): v for k, v in node.items()})  # fmt: skip
    except ValidationError as exc:  # a value out of range (density 1.5, epsilon too wide for a density)
        raise _fail("parameters", str(exc.errors()[0]["msg"]).removeprefix("Value error, ")) from None
    return MergekitMix(mix, dtype, notes)


def _parameters(where: str, given: Any, method: str, allowed: set[str]) -> dict[str, Any]:
    if given is None:
        return {}
    if not isinstance(given, Mapping):
        raise _fail(where, "must be a mapping of parameter names to values")
    out = {}
    for key, value in given.items():
        if key not in allowed:
            raise _fail(f"{where}.{key}", f"mergekit's {method} does not take {key!r} (it takes "
                        f"{', '.join(sorted(allowed))})")  # fmt: skip
        out[key] = _scalar(f"{where}.{key}", value, bool if key in ("normalize", "rescale", "int8_mask") else float)
    return out


def _weight(where: str, values: dict[str, Any]) -> float:
    if "weight" not in values:
        raise _fail(f"{where}.parameters.weight", "mergekit needs a weight for every model (here or under parameters)")
    return values["weight"]
