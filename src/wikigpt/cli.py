"""The `wikigpt` command. Each subcommand is a settings class (its flags and help come from the
class's documented fields) plus a function that runs it.

argparse is built from the pydantic fields here, by hand, because we want exactly one
precedence rule (flag > WIKIGPT_* env var > default), kebab-case flags with the field's
docstring as help, and every failure, including validation, to leave through the one
error-to-exit-code mapping in errors.py; pydantic-settings' own CLI source mixes env parsing
into argparse and exits on its own. Heavy imports (torch) happen inside the commands so that
`wikigpt ui` and `--help` stay fast and torch-free.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from . import __version__
from .errors import ConfigError, WikigptError
from .settings import (
    DecodingCheckSettings, EvalSettings, ExportSettings, GenerateSettings, PrepareSettings, PushSettings,
    ReportSettings, ScoreSettings, ServeSettings, TrainSettings, UISettings,
)
from .presets import build


@dataclass
class Command:
    settings: type[BaseModel]
    run: Callable[[Any], int | None]
    positional: tuple[str, ...] = ()
    presets: bool = False  # adds --preset NAME (configs/NAME.yaml), ranked below flags and env vars


def _quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def run_generate(s: GenerateSettings) -> int:
    _quiet_transformers()
    from .generation import stream
    from .modeling import load_model
    from .decoding import SamplingParams

    lm = load_model(s)
    params = SamplingParams(**{k: getattr(s, k) for k in SamplingParams.model_fields})
    out = sys.stdout
    out.write(s.prompt)
    out.flush()
    for piece in stream(lm, s.prompt, params):
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    return 0


def streamlit_command(s: UISettings) -> tuple[list[str], dict[str, str]]:
    """`streamlit run ui/app.py` with our server flags, and the environment that hands the pages
    their settings (they read UISettings from WIKIGPT_* variables on every run)."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ui", "app.py")
    argv = [
        sys.executable, "-m", "streamlit", "run", script,
        "--server.address", s.host, "--server.port", str(s.port), "--server.headless", "true",
        "--browser.gatherUsageStats", "false",  # no telemetry
        "--client.showErrorDetails", "none",  # even a bug must not put a traceback in the page
        "--client.toolbarMode", "minimal", "--server.fileWatcherType", "none",
    ]
    env = dict(os.environ)
    for name, value in s.model_dump().items():
        if value is None:
            env.pop(f"WIKIGPT_{name.upper()}", None)
        else:
            env[f"WIKIGPT_{name.upper()}"] = str(value)
    return argv, env


def run_ui(s: UISettings) -> int:
    import importlib.util

    if importlib.util.find_spec("streamlit") is None:
        raise ConfigError("the web UI needs Streamlit: pip install 'wikigpt[ui]'")
    argv, env = streamlit_command(s)
    print(f"wikigpt ui: http://{s.host}:{s.port} talking to the API at {s.api_url}", file=sys.stderr, flush=True)
    # exec, not a child process: Ctrl-C and `docker stop` (SIGTERM) reach Streamlit directly.
    os.execve(argv[0], argv, env)
    return 0  # not reached


def run_serve(s: ServeSettings) -> int:
    import logging

    from .api import create_app
    from .api.server import serve

    logging.basicConfig(level=s.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if s.upstream:  # forward completions to an OpenAI-compatible server: no torch, no model here
        from .api.upstream import UpstreamClient

        serve(create_app(s, UpstreamClient(s)), s.host, s.port, s.log_level)
        return 0
    _quiet_transformers()
    from .engine import Engine
    from .modeling import load_model

    lm = load_model(s)  # a missing model fails here, before the port opens: exit code 2
    engine = Engine(lm, max_batch_size=s.max_batch_size, queue_size=s.queue_size,
                    dtype=s.dtype, compile=s.compile, stream_backlog=s.stream_backlog,
                    quantization=s.quantization, prefix_caching=s.prefix_caching)
    # No reload, no debug; uvicorn's own access log is off because ours (api.metrics.AccessLog) adds
    # timing and leaves out query strings. SIGTERM drains (api/server.py), then exits 0.
    serve(create_app(s, engine), s.host, s.port, s.log_level)
    return 0


def run_score(s: ScoreSettings) -> int:
    """Per-token table, then perplexity and bits per byte; over HTTP only (no torch here)."""
    from pathlib import Path

    from .client import score_text
    from .scoring import table_rows

    path = Path(s.text).expanduser()
    try:
        text = path.read_text(encoding="utf-8") if path.is_file() else s.text
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path} as UTF-8 text: {exc}") from None
    scored = score_text(s, text, top=s.top_logprobs)
    head = ("#", "token", "p", "surprise bits", f"top {s.top_logprobs}")
    rows = table_rows(scored, s.top_logprobs)
    if not s.plain and sys.stdout.isatty() and importlib.util.find_spec("rich") is not None:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        table = Table(*head, title=f"{s.api_url}: {scored.model}")
        for row, t in zip(rows, scored.tokens):
            table.add_row(*map(Text, row), style=None if t.surprise is None or t.surprise < 8 else "bold red")
        Console().print(table)
    else:
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
        for row in [head, *rows]:
            print("  ".join(c.ljust(w) if i == 1 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))),
                  row[4], sep="  ")
    print(scored.summary())
    return 0


def _lazy(module: str, func: str = "run") -> Callable[[Any], int | None]:
    """A command that imports its module (and with it torch) only when it runs."""

    def run(settings: Any) -> int | None:
        _quiet_transformers()
        return getattr(importlib.import_module(f".{module}", __package__), func)(settings)

    return run


COMMANDS: dict[str, Command] = {
    "prepare": Command(PrepareSettings, _lazy("train", "run_prepare"), presets=True),
    "train": Command(TrainSettings, _lazy("train"), presets=True),
    "generate": Command(GenerateSettings, run_generate, positional=("prompt",)),
    "evaluate": Command(EvalSettings, _lazy("evaluate")),
    "decoding-check": Command(DecodingCheckSettings, _lazy("quality")),
    "report": Command(ReportSettings, _lazy("report"), positional=("run_dir",)),
    "export": Command(ExportSettings, _lazy("export"), positional=("model",)),
    "push": Command(PushSettings, _lazy("push"), positional=("run_dir",)),
    "ui": Command(UISettings, run_ui),
    "score": Command(ScoreSettings, run_score, positional=("text",)),
    "serve": Command(ServeSettings, run_serve),
}


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def add_settings_arguments(parser: argparse.ArgumentParser, cls: type[BaseModel], positional=()) -> None:
    """One flag per field, documented by the field's docstring."""
    prefix = cls.model_config.get("env_prefix", "")
    for name, field in cls.model_fields.items():
        tp = _unwrap_optional(field.annotation)
        origin = typing.get_origin(tp)
        help_text = (field.description or "").replace("%", "%%")
        if name in positional:
            parser.add_argument(name, help=help_text, default=argparse.SUPPRESS)
            continue
        default = field.get_default(call_default_factory=True)
        extra = f" [default: {default!r}" + (f"; env {prefix}{name.upper()}]" if prefix else "]")
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text + extra}
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is list:
            kwargs.update(action="append", metavar=name.upper())
        elif origin is Literal:
            kwargs["choices"] = [str(c) for c in typing.get_args(tp)]
        else:
            kwargs["metavar"] = name.upper()
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        flags = extra.get("cli_flag") or "--" + name.replace("_", "-")  # e.g. json_output -> --json
        parser.add_argument(*([flags] if isinstance(flags, str) else flags), **kwargs)


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's, wrapping at spaces only: a cited docs/page.md#some-anchor stays whole."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        return textwrap.wrap(self._whitespace_matcher.sub(" ", text).strip(), width, break_on_hyphens=False)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wikigpt",
        description="Fine-tune a GPT-2-family model on WikiText, measure it, and serve it.",
    )
    parser.add_argument("--version", action="version", version=f"wikigpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        doc = (cmd.settings.__doc__ or "").strip()
        p = sub.add_parser(name, help=doc.splitlines()[0] if doc else None, description=doc,
                           formatter_class=_HelpFormatter)
        add_settings_arguments(p, cmd.settings, cmd.positional)
        if cmd.presets:
            p.add_argument("--preset", metavar="NAME", default=None,
                           help="configs/NAME.yaml (or a .yaml path): settings below flags and env vars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(make_parser().parse_args(argv))
    cmd = COMMANDS[args.pop("command")]
    try:
        settings = build(cmd.settings, args, preset=args.pop("preset", None))
        return int(cmd.run(settings) or 0)
    except WikigptError as exc:
        print(f"wikigpt: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("wikigpt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `wikigpt generate ... | head` closed the pipe: not an error
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
