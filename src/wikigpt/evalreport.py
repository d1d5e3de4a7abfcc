"""MODEL_DIR/eval_report.json: what `wikigpt evaluate` records, and the summary of it that the
API's health route sends and the web UI shows.

No torch here: the UI image (no torch) imports the summary's schema from this module.

File format: {"format": 1, "model": dir, "latest": result, "results": [result, ...],
"others": [results of other models evaluated in the same command, e.g. the base model]}.
Each result is `evaluate.EvalResult.to_dict()` plus "measured_at": perplexity,
word_perplexity, bits_per_byte and how they were measured.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol, TypedDict

from .files import write_atomic


class Result(Protocol):
    """One measurement (`evaluate.EvalResult`): what it records is its `to_dict()`."""

    def to_dict(self) -> dict: ...


REPORT_FILE = "eval_report.json"


class EvalSummary(TypedDict, total=False):
    """The latest measurement, flat: GET / and /health send it as "eval" (null when the model
    folder holds no report). Keys whose value is not a finite number are left out (JSON has no
    NaN: a text without words has no word perplexity)."""

    perplexity: float
    word_perplexity: float
    bits_per_byte: float
    data: str  # the text source (a Hub config or a folder)
    split: str | None
    n_tokens: int  # tokens scored
    complete: bool  # False when --max-tokens scored only the start of the split
    measured_at: str  # UTC, ISO 8601


def result_key(d: dict) -> tuple | None:
    """Results measured under the same conditions replace each other in eval_report.json;
    None for an entry that does not say its conditions (an old or hand-edited file)."""
    try:
        return (d["data"], d["split"], d["window"], d["stride"], d["n_tokens"] if not d["complete"] else None)
    except (KeyError, TypeError):
        return None


def read_eval_report(model_dir: str | os.PathLike) -> dict | None:
    path = Path(model_dir) / REPORT_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summarize(report: dict | None) -> EvalSummary | None:
    """The EvalSummary of an eval_report.json's content; None when it holds no measurement."""
    latest = report.get("latest") if isinstance(report, dict) else None
    if not isinstance(latest, dict):
        return None
    return EvalSummary(**{k: latest[k] for k in EvalSummary.__annotations__
                          if k in latest and not (isinstance(latest[k], float) and not math.isfinite(latest[k]))})


def eval_summary(model: str | os.PathLike) -> EvalSummary | None:
    """The summary of MODEL/eval_report.json; None for a Hub id or a folder without a report."""
    return summarize(read_eval_report(model)) if os.path.isdir(model) else None


def write_eval_report(model_dir: str | os.PathLike, result: Result, others: Sequence[Result] = ()) -> Path:
    """Add `result` to MODEL_DIR/eval_report.json, keeping results under other conditions.

    Two evaluations may finish at once on one model folder: the read-modify-write holds an
    exclusive lock on the folder, and the new file replaces the old one atomically (a reader
    never sees half a report).
    """
    path = Path(model_dir) / REPORT_FILE
    with _folder_lock(path.parent):
        old = read_eval_report(model_dir) or {}  # an unreadable old report only held past measurements
        _write_json(path, _merged(old if isinstance(old, dict) else {}, str(model_dir), result, others))
    return path


def _merged(old: dict, model: str, result: Result, others: Sequence[Result]) -> dict:
    new = result.to_dict()
    new["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    key = result_key(new)
    results = [r for r in old.get("results", []) if isinstance(r, dict) and result_key(r) != key]
    other_dicts = [o.to_dict() | {"measured_at": new["measured_at"]} for o in others]
    replaced = {(o["model"], result_key(o)) for o in other_dicts}
    kept_others = [o for o in old.get("others", []) if isinstance(o, dict) and (o.get("model"), result_key(o)) not in replaced]
    return {"format": 1, "model": model, "latest": new, "results": [*results, new], "others": [*kept_others, *other_dicts]}


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """flock on the folder itself (no lock file left behind); released when the fd closes,
    also when the process is killed."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_json(path: Path, payload: dict) -> None:
    write_atomic(path, json.dumps(payload, indent=2) + "\n")
