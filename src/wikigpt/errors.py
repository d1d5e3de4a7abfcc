"""Typed errors and the one table that maps them to HTTP status codes and CLI exit codes.

Every module raises these (never a bare Exception for a user mistake); the CLI and the API
read `exit_code` / `http_status` from here, so a new error type is mapped in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import ValidationError


class WikigptError(Exception):
    """Base class: a failure with a message meant for a person, not a traceback."""

    exit_code = 1
    http_status = 500
    error_type = "server_error"
    param: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if param is not None:
            self.param = param


class ConfigError(WikigptError):
    """A setting or argument is invalid (bad flag value, unknown preset, missing data)."""

    exit_code = 2
    http_status = 400
    error_type = "invalid_request_error"


class ModelNotFoundError(ConfigError):
    """The model id or directory could not be found, downloaded or read."""

    http_status = 404
    error_type = "not_found_error"


class InvalidRequestError(ConfigError):
    """A client sent a request the server cannot serve (empty prompt, prompt too long, ...)."""


class AuthenticationError(WikigptError):
    exit_code = 2
    http_status = 401
    error_type = "authentication_error"


class OverloadedError(WikigptError):
    """The request queue is full; the client should retry later."""

    exit_code = 3
    http_status = 503
    error_type = "overloaded_error"

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotReadyError(OverloadedError):
    """The model is still loading."""


class PayloadTooLargeError(InvalidRequestError):
    """The request body is larger than the server accepts (--max-body-bytes)."""

    http_status = 413


class NotFoundError(InvalidRequestError):
    """No such route or resource."""

    http_status = 404
    error_type = "not_found_error"


class MethodNotAllowedError(InvalidRequestError):
    """The route exists but not for this HTTP method."""

    http_status = 405


class EngineError(WikigptError):
    """Generation failed inside the server (a bug or out of memory); the request was dropped."""


class SlowReaderError(WikigptError):
    """A streaming client stopped reading (connected but silent) while its chunks piled up past
    --stream-backlog: the request was aborted and its slot freed. Sent as the stream's last event."""

    http_status = 408
    error_type = "timeout_error"


class ShuttingDownError(OverloadedError):
    """The server received SIGTERM: it takes no new requests, and ends those still running when
    the grace period (--shutdown-grace) is over."""


class HubError(WikigptError):
    """The Hugging Face Hub refused or failed an upload (`wikigpt push`), its message passed on."""


class UpstreamError(WikigptError):
    """The upstream server (`serve --upstream`) is unreachable, failed, or dropped the answer."""

    http_status = 503
    error_type = "upstream_error"


class UpstreamTimeoutError(UpstreamError):
    """The upstream server did not answer within --upstream-read-timeout."""

    http_status = 504


class UpstreamRejectedError(InvalidRequestError):
    """The upstream refused the request as invalid (its 4xx, passed on with its status and message)."""

    def __init__(self, message: str, *, status: int, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.http_status = status
        if status == 404:
            self.error_type = "not_found_error"


def field_path(error: Mapping[str, Any]) -> str:
    """A pydantic error's field as a dotted path (`prompt.0`); '' when the error is about the
    input as a whole."""
    return ".".join(str(p) for p in error.get("loc") or ())


def describe_validation_error(
    exc: ValidationError | Sequence[Mapping[str, Any]],
    *,
    title: str = "invalid settings",
    as_flags: bool = True,
    limit: int | None = None,
    message: Callable[[str, Mapping[str, Any]], str | None] | None = None,
) -> str:
    """One line naming each bad field and why, e.g. 'invalid settings: --max-steps: Input
    should be greater than or equal to 1'. The one formatter of validation errors: the CLI's
    (flags) and the API's (body fields, title 'invalid request').

    exc: a pydantic ValidationError, or its .errors() list (FastAPI's RequestValidationError).
    as_flags: name a field as its CLI flag (--max-new-tokens; 'input' for the whole input);
    else as its path in the request body (prompt.0; nothing for the whole body).
    limit: name at most this many errors.
    message(path, error): a replacement for pydantic's message, or None to keep it.
    """
    errors = list(exc) if isinstance(exc, Sequence) else exc.errors()
    parts = []
    for err in errors[:limit]:
        path = field_path(err)
        msg = (message and message(path, err)) or err.get("msg") or "invalid"
        name = ("--" + path.replace("_", "-") if path else "input") if as_flags else path
        parts.append(f"{name}: {msg}" if name else msg)
    return f"{title}: " + "; ".join(parts)
