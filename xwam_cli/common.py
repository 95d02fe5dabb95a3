"""What every command shares: the error boundary, the console, recipe loading with CLI overrides.

The error boundary (`user_errors` on every command, `XWAMGroup` for the command line itself) keeps the
promise of README.md: bad input ends with one `error:` line naming the path/key/value and what was
expected, and a non-zero exit. The full traceback is shown only with `xwam --debug CMD ...` or
XWAM_DEBUG=1; an unexpected exception (a bug) is one line too, saying so and how to see its traceback.
"""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from typer.core import TyperGroup

try:  # typer >= 0.2x carries its own copy of click
    from typer._click.exceptions import ClickException
except ImportError:  # older typer runs on click itself
    from click import ClickException  # type: ignore[assignment,no-redef]

from xwam_core.errors import XWAMError, os_error_line

if TYPE_CHECKING:  # xwam_core.recipe imports torch and diffusers: `xwam --help` must not wait for them
    from xwam_core.recipe import Recipe

console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

DEBUG_ENV = "XWAM_DEBUG"
INTERRUPTED_TRUTH = (
    "nothing partial was left: outputs are written under a temporary name and renamed only when complete"
)
_debug_option = False  # `xwam --debug`: set by the app's callback on every invocation


def set_debug(on: bool) -> None:
    """Record the `--debug` option of this invocation (xwam_cli.main's callback)."""
    global _debug_option
    _debug_option = on


def debug_enabled() -> bool:
    """Whether errors show their traceback: `xwam --debug ...` or XWAM_DEBUG=1 (not 0/false/no)."""
    return _debug_option or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def one_line(text: str) -> str:
    """Text on one line (a message from a library may span several)."""
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one clear line to stderr and exit non-zero."""
    err_console.print(f"[bold red]error:[/] {escape(one_line(message))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def interrupted(what_is_on_disk: str = INTERRUPTED_TRUTH) -> NoReturn:
    """Ctrl-C: one line saying what is on disk now, exit 130 (the shell's code for SIGINT)."""
    err_console.print(f"[bold red]interrupted[/]: {escape(what_is_on_disk)}", highlight=False, soft_wrap=True)
    raise typer.Exit(130)


def _bug_line(error: BaseException) -> str:
    return (
        f"unexpected {type(error).__name__}: {one_line(str(error)) or '(no message)'}; this is a bug in xwam, "
        f"not in your input: rerun with `xwam --debug ...` (or {DEBUG_ENV}=1) for the traceback and report it"
    )


def _out_of_memory(error: BaseException) -> bool:
    """Host memory (MemoryError) or an accelerator's (torch.OutOfMemoryError, named so torch stays unimported)."""
    return isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"


def _memory_line(error: BaseException) -> str:
    # torch's first two sentences: what ran out and how much it tried to allocate; the rest is tuning advice
    detail = ". ".join(one_line(str(error)).split(". ")[:2]).rstrip(".")
    return (
        f"out of memory{f' ({detail})' if detail else ''}; expected a smaller data.batch_size, image size "
        "or model, or a machine with more memory"
    )


def user_errors(fn: F) -> F:
    """The error boundary of one command: every failure ends in one `error:` line and a non-zero exit.

    XWAMError (input, settings, damaged files) and OSError (file system) say what and where; anything
    else is a bug and says so. With --debug / XWAM_DEBUG=1 the traceback is printed before the line.
    Ctrl-C goes to `interrupted`. typer/click exits and usage errors pass through (XWAMGroup prints those).
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, ClickException):
            raise
        except KeyboardInterrupt:
            interrupted()
        except XWAMError as e:
            _traceback_if_debug()
            fail(str(e))
        except OSError as e:
            _traceback_if_debug()
            fail(os_error_line(e))
        except Exception as e:
            _traceback_if_debug()
            fail(_memory_line(e) if _out_of_memory(e) else _bug_line(e))

    return wrapper  # type: ignore[return-value]


def _traceback_if_debug() -> None:
    if debug_enabled():
        traceback.print_exc(file=sys.stderr)


class XWAMGroup(TyperGroup):
    """The `xwam` command group: a usage error (a missing, unknown or mistyped option or argument) ends in
    the same one `error:` line as every other error, instead of click's usage box."""

    def main(  # type: ignore[override]
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except ClickException as e:
            if not standalone_mode:
                raise
            if type(e).__name__ == "NoArgsIsHelpError":  # bare `xwam`: the help is already printed
                sys.exit(e.exit_code)
            err_console.print(f"[bold red]error:[/] {escape(usage_line(e))}", highlight=False, soft_wrap=True)
            sys.exit(e.exit_code)
        except typer.Abort:  # end of input at a prompt
            if not standalone_mode:
                raise
            err_console.print("[bold red]aborted[/]", highlight=False)
            sys.exit(1)
        if not standalone_mode:
            return result
        # standalone: a command's typer.Exit(code) comes back as its code; a finished command as None
        sys.exit(result if isinstance(result, int) else 0)


def usage_line(error: ClickException) -> str:
    """click's message (`Missing option '--ckpt'.`) as the project's line, with where to look."""
    message = one_line(error.format_message()).rstrip(".")
    message = message[:1].lower() + message[1:]
    ctx = getattr(error, "ctx", None)
    return f"{message}; see '{ctx.command_path} --help'" if ctx is not None else message


def recipe_with(recipe_path: Path | None, overrides: list[str] | None, cli: dict[str, Any]) -> Recipe:
    """Recipe file (or defaults) + `--set` overrides + explicit CLI options (those win)."""
    from xwam_core.recipe import load_recipe

    sets = list(overrides or [])
    options = [f"{key}={_toml_value(value)}" for key, value in cli.items() if value is not None]
    # an error names where a bad value came from: the file, its --set overrides, the command's options
    sources = [
        name for name, given in (("--set overrides", sets), ("command-line options", options)) if given
    ]
    return load_recipe(recipe_path, sets + options, " and ".join(sources))


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
        err_console.print(escape(message), highlight=False)


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


def check_output(path: Path, flag: str, folder: bool = False) -> None:
    """Refuse, before any work, an output path that cannot be written: a file where a folder goes (or the
    other way round), or a path under a file."""
    if folder and path.exists() and not path.is_dir():
        raise XWAMError(f"{flag} {path}: is a file; expected a folder")
    if not folder and path.is_dir():
        raise XWAMError(f"{flag} {path}: is a folder; expected a file path")
    ancestor = next((p for p in path.parents if p.exists()), None)  # the nearest one that exists
    if ancestor is not None and not ancestor.is_dir():
        raise XWAMError(f"{flag} {path}: {ancestor} is a file; expected a folder")


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
