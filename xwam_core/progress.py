"""How long work reports how far it got: the core calls a `Progress`, the CLI draws it.

One interface for every long loop (prepare, train, infer, reconstruct, evaluate, closed loop):

    def work(items, progress: Progress = SILENT):
        bar = progress.task("windows", total=len(items))
        for item in items:
            ...
            bar.advance(info=f"{ms:.0f} ms/window")

`SILENT` does nothing (notebooks, tests); the CLI passes a rich progress bar (xwam_cli.common).
`task(..., completed=k)` starts a bar part-way (a resumed run); `info` is a short status text.
"""

from __future__ import annotations

from typing import Protocol


class ProgressTask(Protocol):
    def advance(self, n: int = 1, info: str | None = None) -> None:
        """`n` more items done; `info` replaces the status text when given."""


class Progress(Protocol):
    def task(self, label: str, total: int, completed: int = 0) -> ProgressTask:
        """A new bar for `total` items, `completed` of them already done."""

    def log(self, message: str) -> None:
        """A line of text beside the bars (a summary, a warning)."""


class _SilentTask:
    def advance(self, n: int = 1, info: str | None = None) -> None:
        pass


class _Silent:
    def task(self, label: str, total: int, completed: int = 0) -> ProgressTask:
        return _SilentTask()

    def log(self, message: str) -> None:
        pass


SILENT: Progress = _Silent()
