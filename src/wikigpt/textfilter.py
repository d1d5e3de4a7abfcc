"""Cleaning a model's continuation into what a user sees: cut before the first stop string,
runs of blank lines collapsed to one. `ContinuationFilter` works on text arriving in pieces
(the CLI, the engine, the upstream relay) and `clean_continuation` on whole strings, with the
same result. Plain text only, no torch: the gateway (`serve --upstream`) imports it.
"""

from __future__ import annotations

import re

# Two or more blank lines (lines holding only spaces/tabs) in a row become one blank line.
BLANK_RUN = re.compile(r"\n[ \t\r\f\v]*(?:\n[ \t\r\f\v]*)+\n")


def collapse_blank_lines(text: str) -> str:
    return BLANK_RUN.sub("\n\n", text)


class ContinuationFilter:
    """Incrementally cleans a model's continuation.

    `feed(piece)` returns the text that is now safe to show: text that cannot change any more.
    Held back are trailing whitespace (it may grow into a run of blank lines that is collapsed)
    and a tail that could be the start of a stop string. Once a stop string appears, `done` is
    set and nothing after it is ever returned. `finish()` returns the rest.
    """

    def __init__(self, stop: list[str] | tuple[str, ...] = ()) -> None:
        self.stop = [s for s in stop if s]
        self.raw = ""
        self.done = False
        self._emitted = 0

    def _stop_index(self) -> int:
        hits = [i for i in (self.raw.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else -1

    def _safe_prefix_len(self) -> int:
        """Length of the raw text that no future piece can change."""
        n, prev = len(self.raw), -1
        while n != prev:  # until neither rule shortens it further
            prev = n
            n = len(self.raw[:n].rstrip())
            for s in self.stop:  # hold back a tail that is a proper prefix of a stop string
                for k in range(min(len(s) - 1, n), 0, -1):
                    if self.raw[:n].endswith(s[:k]):
                        n -= k
                        break
        return n

    def _emit(self, upto: int, final: bool) -> str:
        cleaned = collapse_blank_lines(self.raw[:upto])
        if final:
            cleaned = cleaned.rstrip()
        out = cleaned[self._emitted :]
        self._emitted = max(self._emitted, len(cleaned))
        return out

    def feed(self, piece: str) -> str:
        if self.done:
            return ""
        self.raw += piece
        idx = self._stop_index()
        if idx >= 0:
            self.done = True
            return self._emit(idx, final=True)
        return self._emit(self._safe_prefix_len(), final=False)

    def finish(self) -> str:
        if self.done:
            return ""
        self.done = True
        return self._emit(len(self.raw), final=True)


def clean_continuation(raw: str, stop: list[str] | tuple[str, ...] = ()) -> str:
    """Whole-string form of ContinuationFilter (same result as feeding it piece by piece)."""
    f = ContinuationFilter(stop)
    return f.feed(raw) + f.finish()
