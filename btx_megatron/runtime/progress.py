"""Progress lines for long offline tools (merge, conversion): ``[tag] 120.5/500.0 MiB, 85.3 MiB/s``.

One line on stderr, refreshed in place on a terminal and rate-limited (at most one line every
``interval`` seconds: 0.5 s on a terminal, 5 s into a log file, so logs stay short); the final
line is always printed. Updates come from one thread.
"""

from __future__ import annotations

import sys
import time

MIB = float(1 << 20)


class Progress:
    """Bytes (and optionally items) done out of a known total, with the rate since the start."""

    def __init__(self, tag: str, total_bytes: int, *, total_items: int | None = None, item_name: str = "tensors",
                 enabled: bool = True, interval: float | None = None, stream=None) -> None:
        self.tag, self.total_bytes, self.total_items, self.item_name = tag, int(total_bytes), total_items, item_name
        self.bytes = 0
        self.items = 0
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (0.5 if self.tty else 5.0)
        self.start = self._last = time.perf_counter()
        self._finished = False
        self._width = 0

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    @property
    def rate_mib_s(self) -> float:
        return self.bytes / MIB / max(self.seconds, 1e-9)

    def line(self, detail: str = "") -> str:
        items = f"{self.items}/{self.total_items} {self.item_name}, " if self.total_items is not None else ""
        text = (f"[{self.tag}] {items}{self.bytes / MIB:,.1f}/{self.total_bytes / MIB:,.1f} MiB, "
                f"{self.rate_mib_s:,.1f} MiB/s")
        return f"{text} ({detail})" if detail else text

    def update(self, nbytes: int, items: int = 0, detail: str = "") -> None:
        self.bytes += int(nbytes)
        self.items += items
        if not self.enabled:
            return
        now = time.perf_counter()
        complete = self.bytes >= self.total_bytes and (self.total_items is None or self.items >= self.total_items)
        if complete:
            self.finish(detail)
        elif now - self._last >= self.interval:
            self._last = now
            self._print(self.line(detail), final=False)

    def finish(self, detail: str = "") -> None:
        """Print the final line (once), ending the refreshed line on a terminal."""
        if self.enabled and not self._finished:
            self._finished = True
            self._print(self.line(detail), final=True)

    def _print(self, text: str, final: bool) -> None:
        if self.tty:  # overwrite the previous refresh, padding over a longer one
            text, self._width = "\r" + text.ljust(self._width), len(text)
        print(text, end="\n" if final or not self.tty else "", file=self.stream, flush=True)


__all__ = ["Progress"]
