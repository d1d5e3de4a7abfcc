"""Request and response schemas of the HTTP API, and reading a request body into one.

Request bodies are read here, not by FastAPI's body binding, because the original contract is
`curl -d '{"text": ...}'` with no Content-Type (curl then labels the JSON as form data): every
POST body is parsed as UTF-8 JSON whatever its content type, under a size cap, and every
failure becomes a typed error from errors.py rendered in OpenAI's error shape.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from ..decoding import KNOBS, SamplingParams
from ..errors import InvalidRequestError, PayloadTooLargeError, WikigptError, describe_validation_error, field_path

Schema = TypeVar("Schema", bound=BaseModel)
# Deepest JSON nesting a body may have: the deepest valid request is 3 levels (a list of
# token-id lists inside the object); 32 leaves room and stays far from Python's recursion limit.
MAX_DEPTH = 32
_SURROGATE = re.compile("[\ud800-\udfff]")


class PredictRequest(SamplingParams):
    """The original contract, `{"text": "..."}`, plus optional sampling settings."""

    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid", strict=True)

    text: str = Field(min_length=1, max_length=100_000)
    """The prompt to continue; the answer repeats it followed by the continuation."""

    def sampling(self) -> SamplingParams:
        return SamplingParams(**self.model_dump(exclude={"text"}))


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


def _optional_knobs() -> type[BaseModel]:
    """SamplingParams' knobs, each optional with the same bounds: the OpenAI-style fields."""
    fields = {name: (Annotated[SamplingParams.model_fields[name].annotation,
                               *SamplingParams.model_fields[name].metadata] | None, None) for name in KNOBS}
    return create_model("_OpenAIKnobs", __config__=ConfigDict(extra="forbid", strict=True), **fields)


class _OpenAISampling(_optional_knobs()):
    """The sampling fields OpenAI's completions and chat completions share, and vLLM's extras
    (top_k, min_p, repetition_penalty). Omitted ones take wikigpt's decoding defaults
    (SamplingParams), not OpenAI's, because those are what keeps this model's text readable."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    ignore_eos: bool = False
    """Keep generating past the end-of-text token (benchmarks use it for fixed lengths)."""
    user: str | None = None
    presence_penalty: float = Field(0.0, ge=0.0, le=0.0)
    frequency_penalty: float = Field(0.0, ge=0.0, le=0.0)
    logit_bias: dict[str, float] | None = Field(None, max_length=0)

    def _sampling(self, index: int, max_tokens: int | None, extra_stop: list[str] = ()) -> SamplingParams:
        """Choice `index`'s parameters: ours where a field is omitted; seeds differ per choice."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        values = dict({k: getattr(self, k) for k in KNOBS}, max_new_tokens=max_tokens or None,
                      seed=None if self.seed is None else (self.seed + index) % 2**63, stop=[*stop, *extra_stop])
        try:
            return SamplingParams(**{k: v for k, v in values.items() if v is not None})
        except ValidationError as exc:
            raise invalid(exc) from None


class CompletionRequest(_OpenAISampling):
    """OpenAI's legacy completions request."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0, le=4096)
    """0 (with `echo`) generates nothing: the answer is the prompt, scored when `logprobs` is set."""
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    """Return each token's log-probability and its N most likely alternatives (OpenAI's legacy
    `logprobs` object); with `echo`, the prompt's tokens are scored too."""
    suffix: None = None
    best_of: int | None = Field(None, ge=1, le=16)

    @field_validator("prompt")
    @classmethod
    def _prompt_items(cls, value):
        if isinstance(value, list) and len(value) > 64 and not isinstance(value[0], int):
            raise ValueError("at most 64 prompts per request")
        if isinstance(value, list) and not value:
            raise ValueError("must not be empty")
        if isinstance(value, list) and any(isinstance(p, (str, list)) and not p for p in value):
            raise ValueError("prompts must not be empty")
        return value

    @property
    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        return [list(p)] if isinstance(p[0], int) else list(p)

    def sampling(self, index: int) -> SamplingParams:
        return self._sampling(index, self.max_tokens)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] = Field(max_length=1_000_000)
    """Text, or OpenAI's list of content parts (text parts only)."""
    name: str | None = None


class ChatRequest(_OpenAISampling):
    """OpenAI's chat completions request; api/chat.py turns the messages into the prompt."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    """OpenAI's newer name for max_tokens; either may be sent."""
    logprobs: bool = False
    """Return each generated token's log-probability (OpenAI's chat `logprobs.content`)."""
    top_logprobs: int | None = Field(None, ge=0, le=20)
    """With `logprobs`: this many most likely alternatives per token."""

    def sampling(self, index: int, extra_stop: list[str]) -> SamplingParams:
        return self._sampling(index, self.max_completion_tokens or self.max_tokens, extra_stop)


class TokenizeRequest(BaseModel):
    """vLLM's `POST /tokenize` (its completion form): the prompt's token ids."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str = Field(max_length=1_000_000)
    add_special_tokens: bool = True
    """Add the tokenizer's special tokens (GPT-2's adds none)."""
    return_token_strs: bool = False
    """Also return each token as the tokenizer spells it (byte-level BPE: "Ġthe" for " the")."""


class DetokenizeRequest(BaseModel):
    """vLLM's `POST /detokenize`: token ids back to text."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    tokens: list[int] = Field(max_length=1_000_000)


# Accepted by OpenAI, refused here: what a client may send instead.
_UNSUPPORTED = {"suffix": "null", "presence_penalty": "0", "frequency_penalty": "0",
                "logit_bias": "{}"}


# Where FastAPI found a bad value; it stands first in the error's location, before the field.
_REQUEST_PARTS = ("body", "query", "path", "header")


def invalid(exc: ValidationError | RequestValidationError) -> InvalidRequestError:
    """A 400 naming each bad field in the body's own terms (`text`, not `--text` or `body.text`)."""
    errors = [_in_body(e) for e in exc.errors()]
    param = next((path for e in errors if (path := field_path(e))), None)
    return InvalidRequestError(describe_validation_error(errors, title="invalid request", as_flags=False, limit=5,
                                                         message=_message), param=param)


def _in_body(error: Mapping[str, Any]) -> Mapping[str, Any]:
    loc = tuple(error.get("loc") or ())
    return {**error, "loc": loc[1:]} if loc and loc[0] in _REQUEST_PARTS else error


def _message(path: str, err: Mapping[str, Any]) -> str | None:
    if err["type"] == "extra_forbidden":
        return "unknown field"
    if path in _UNSUPPORTED:
        return f"not supported by this server (leave it out or send {_UNSUPPORTED[path]})"
    if err["type"] == "missing":
        return "field required"
    return None


def error_body(exc: WikigptError) -> dict:
    return {"error": {"message": exc.message, "type": exc.error_type, "param": exc.param, "code": None}}


async def read_body(request: Request, schema: type[Schema], limit: int) -> Schema:
    """The body as `schema`, whatever its Content-Type, at most `limit` bytes."""
    declared = request.headers.get("content-length", "")
    too_big = PayloadTooLargeError(f"the request body is larger than {limit} bytes (--max-body-bytes)")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise too_big
    return parse_body(bytes(raw), schema)


def parse_body(raw: bytes, schema: type[Schema]) -> Schema:
    if not raw.strip():
        raise InvalidRequestError('the request body is empty: send a JSON object such as {"text": "Data Science is"}')
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"the request body is not valid UTF-8 (bad byte at offset {exc.start})") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"the request body is not valid JSON: {exc.msg} "
                                  f"(line {exc.lineno}, column {exc.colno})") from None
    except ValueError as exc:
        raise InvalidRequestError(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:  # the C decoder recurses once per level: ~1,000 levels exhaust the stack
        raise _too_deep(_top_field_at_depth(text, MAX_DEPTH)) from None
    if not isinstance(data, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(data), "a number")
        raise InvalidRequestError(f"the request body must be a JSON object, not {kind}")
    _check_values(data)
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise invalid(exc) from None


def _check_values(data: dict) -> None:
    """Refuse what JSON can spell but nothing downstream can hold: nesting deeper than MAX_DEPTH
    (validators and tokenizers recurse) and lone UTF-16 surrogates (`"\\ud800"`), which are not
    characters: Python keeps them in a str, but the tokenizer (Rust) and UTF-8 cannot encode
    them. Iterative, so a deep body cannot exhaust the stack here; names the first bad field."""
    todo: list[tuple[str, object, int]] = [("", data, 0)]
    while todo:
        path, value, depth = todo.pop()
        if depth > MAX_DEPTH:
            raise _too_deep(re.split(r"[.\[]", path, maxsplit=1)[0] or None)
        if isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else key
                if _SURROGATE.search(key):
                    raise InvalidRequestError(f"a field name ({where!a}) contains a lone UTF-16 surrogate, "
                                              "which is not a character; send valid Unicode")
                todo.append((where, item, depth + 1))
        elif isinstance(value, list):
            todo.extend((f"{path}[{i}]", item, depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str) and (bad := _SURROGATE.search(value)):
            raise InvalidRequestError(f"{path} contains a lone UTF-16 surrogate ({bad.group()!a} at character "
                                      f"{bad.start()}), which is not a character; send valid Unicode",
                                      param=path)


def _too_deep(field: str | None) -> InvalidRequestError:
    where = f"{field} is" if field else "the request body is"
    return InvalidRequestError(f"{where} nested more than {MAX_DEPTH} levels deep", param=field)


def _top_field_at_depth(text: str, limit: int) -> str | None:
    """The top-level key whose value first nests deeper than `limit`, read off the raw text
    (json.loads gave up on it). A plain scan: brackets outside strings, keys at depth 1."""
    depth, key, start, in_string, escaped = 0, None, 0, False, False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
                if depth == 1:
                    key = text[start:i]
        elif ch == '"':
            in_string, start = True, i + 1
        elif ch in "[{":
            depth += 1
            if depth > limit + 1:
                return key
        elif ch in "]}":
            depth -= 1
    return None


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")
