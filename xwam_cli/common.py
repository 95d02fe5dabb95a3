"""What every command shares: one-line errors, the console, recipe loading with CLI overrides."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from xwam_core.errors import XWAMError

if TYPE_CHECKING:  # xwam_core.recipe imports torch and diffusers: `xwam --help` must not wait for them
    from xwam_core.recipe import Recipe

console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str, code: int = 1) -> None:
    """Print one clear line to stderr and exit non-zero."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def user_errors(fn: F) -> F:
    """Turn user-input errors into one line and a non-zero exit instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except XWAMError as e:
            fail(str(e))
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted[/]: nothing was written")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def recipe_with(recipe_path: Path | None, overrides: list[str] | None, cli: dict[str, Any]) -> Recipe:
    """Recipe file (or defaults) + `--set` overrides + explicit CLI options (those win)."""
    from xwam_core.recipe import load_recipe

    sets = list(overrides or [])
    for key, value in cli.items():
        if value is None:
            continue
        sets.append(f"{key}={_toml_value(value)}")
    return load_recipe(recipe_path, sets)


def _toml_value(value: Any) -> str:
    import json

    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return json.dumps(value)  # a JSON list of strings/numbers is a valid TOML array
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))


class RichProgress:
    """The CLI's `xwam_core.progress.Progress`: one rich bar per task (label, bar, n/total, info, time, ETA).

    Use as a context manager. Where stderr is not a terminal (logs, CI) the bars are not drawn; a plain
    line per task is printed at most every `plain_every` seconds and when the task completes.
    """

    def __init__(self, title: str, plain_every: float = 10.0) -> None:
        self.title = title
        self.plain_every = plain_every
        self.live = err_console.is_terminal
        self._bars = Progress(
            TextColumn(f"[bold]{title}" + " {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=err_console,
            disable=not self.live,
        )

    def __enter__(self) -> RichProgress:
        self._bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._bars.stop()

    def task(self, label: str, total: int, completed: int = 0) -> _RichTask:
        return _RichTask(self, self._bars.add_task(label, total=total, completed=completed, info=""), label)

    def log(self, message: str) -> None:
        err_console.print(message, highlight=False)


class _RichTask:
    def __init__(self, owner: RichProgress, task_id: Any, label: str) -> None:
        import time

        self.owner, self.id, self.label = owner, task_id, label
        self._last_plain = time.monotonic()

    def advance(self, n: int = 1, info: str | None = None) -> None:
        import time

        fields = {} if info is None else {"info": info}
        self.owner._bars.update(self.id, advance=n, **fields)
        if self.owner.live:
            return
        task = self.owner._bars.tasks[self.id]
        now = time.monotonic()
        if task.finished or now - self._last_plain >= self.owner.plain_every:
            self._last_plain = now
            text = task.fields.get("info", "")
            err_console.print(
                f"{self.owner.title} {self.label}: {int(task.completed)}/{int(task.total or 0)} {text}",
                highlight=False,
            )


def options_command(options_class: type, run: Callable[[Any], None]) -> Callable[..., None]:
    """A typer command whose options are the fields of `options_class` made with xwam_core's `option()`
    (type, default, help and flag defined once there); it calls `run(options_class(**values))`."""
    import dataclasses
    import inspect
    import typing

    hints = typing.get_type_hints(options_class)
    params, parsers = [], {}
    for f in dataclasses.fields(options_class):
        if "help" not in f.metadata:
            continue
        from xwam_core.infer_options import flag_of

        parse = f.metadata["parse"]
        cli_type = hints[f.name]
        if parse is not None and not isinstance(parse, type):  # text on the command line, parsed
            cli_type = str | None if f.default is None else str
        if parse is not None:
            parsers[f.name] = parse
        flags = [flag_of(f)] if f.metadata["flag"] or cli_type is not bool else []
        required = f.default is dataclasses.MISSING
        params.append(
            inspect.Parameter(
                f.name,
                inspect.Parameter.KEYWORD_ONLY,
                default=inspect.Parameter.empty if required else f.default,
                annotation=typing.Annotated[cli_type, typer.Option(*flags, help=f.metadata["help"])],
            )
        )

    def command(**values: Any) -> None:
        for name, parse in parsers.items():
            if values[name] is not None:
                values[name] = parse(values[name])
        run(options_class(**values))

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


def split_csv(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} GiB"


def is_tty() -> bool:
    return sys.stderr.isatty()
