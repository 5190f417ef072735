"""The progress display on stderr: ``[i/n] 12s op case dtype: what happened``.

On a terminal the line of the case in progress is redrawn in place with a bar, and replaced by its
result when the case ends. When stderr is a file or a pipe (CI logs, the GPU runbook), control
characters would garble the log, so every event is a plain line: one when a case starts (a hang
shows where) and one when it ends.
"""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

BAR_WIDTH = 20


class Progress:
    """Counts cases over a whole run (every op), with elapsed time since it was made."""

    def __init__(self, total: int, stream: Optional[TextIO] = None, tty: Optional[bool] = None):
        self.total, self.done = total, 0
        self.stream = sys.stderr if stream is None else stream
        self.tty = self.stream.isatty() if tty is None else tty
        self.start = time.monotonic()
        self._open_line = False  # a redrawable line is on screen
        self.interrupted = False  # Ctrl-C seen: the runner writes what it has and stops

    def elapsed_s(self) -> float:
        return time.monotonic() - self.start

    def _head(self, index: int) -> str:
        return f"[{index}/{self.total}] {self.elapsed_s():5.0f}s"

    def _bar(self) -> str:
        filled = BAR_WIDTH * self.done // max(1, self.total)
        return "[" + "#" * filled + "." * (BAR_WIDTH - filled) + "]"

    def _write(self, text: str, final: bool) -> None:
        if self.tty:
            # \r + clear to end of line: redraw over the previous, possibly longer, line.
            self.stream.write("\r\033[K" + text + ("\n" if final else ""))
            self._open_line = not final
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def start_case(self, what: str) -> None:
        """A case begins (``what``: op, case label, dtype)."""
        text = f"{self._head(self.done + 1)} {what}: running"
        self._write(f"{self._bar()} {text}" if self.tty else text, final=False)

    def end_case(self, what: str, outcome: str) -> None:
        """The case ended: its one-line ``outcome`` stays on screen / in the log."""
        self.done += 1
        self._write(f"{self._head(self.done)} {what}: {outcome}", final=True)

    def note(self, text: str) -> None:
        """A message between cases (an op starting, a warning)."""
        if self._open_line:
            self.stream.write("\n")
            self._open_line = False
        self.stream.write(text + "\n")
        self.stream.flush()


__all__ = ["Progress"]
