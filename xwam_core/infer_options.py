"""The options of one inference run, each defined once: its type, default, help and flag.

`xwam infer`'s command-line options are generated from these fields (xwam_cli.common.options_command),
the command line a run records comes from them (`InferOptions.command_line`), and the library takes the
same dataclass. Nothing here imports torch, so `xwam infer --help` stays instant.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from xwam_core.errors import XWAMError


def option(default: Any, help: str, flag: str | None = None, parse: Any = None, show: Any = None) -> Any:
    """A dataclass field that is also a command-line option: `flag` (default --field-name), `parse` turns the
    command-line text into the field's value and `show` turns the value back (for the recorded command)."""
    metadata = {"help": help, "flag": flag, "parse": parse, "show": show}
    if default is REQUIRED:
        return field(metadata=metadata)
    return field(default=default, metadata=metadata)


REQUIRED: Any = object()


class EpisodeRanges:
    """`--episodes` as written: inclusive ranges (first, last), never expanded before the store's episode
    count is known (`0-10000000` is two numbers, not ten million).

    Iterating yields the episodes in the order written, each once; it equals a list of the same episodes.
    """

    SHOWN = 5  # missing ranges named in an error line; the rest are counted

    def __init__(self, ranges: list[tuple[int, int]] | tuple[tuple[int, int], ...]) -> None:
        self.ranges = tuple((int(a), int(b)) for a, b in ranges)

    @classmethod
    def of(cls, episodes: Any) -> EpisodeRanges:
        """A list of episode indices (or EpisodeRanges) as ranges."""
        if isinstance(episodes, EpisodeRanges):
            return episodes
        return cls([(int(e), int(e)) for e in episodes])

    def __iter__(self) -> Iterator[int]:
        for i, (first, last) in enumerate(self.ranges):
            earlier = self.ranges[:i]
            for e in range(first, last + 1):
                if not any(a <= e <= b for a, b in earlier):
                    yield e

    def __eq__(self, other: object) -> bool:
        if isinstance(other, EpisodeRanges):
            return self.ranges == other.ranges
        if isinstance(other, (list, tuple)):  # compared lazily: never longer than `other`
            mine = iter(self)
            return all(next(mine, None) == e for e in other) and next(mine, None) is None
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.ranges)

    def __str__(self) -> str:
        return ",".join(_show_range(a, b) for a, b in self.ranges)

    def __repr__(self) -> str:
        return f"EpisodeRanges({str(self)!r})"

    def missing(self, count: int) -> list[tuple[int, int]]:
        """The requested ranges outside 0..count-1, sorted, overlapping ones merged (never expanded)."""
        out: list[tuple[int, int]] = []
        for first, last in self.ranges:
            if first < 0:
                out.append((first, min(last, -1)))
            if last >= count:
                out.append((max(first, count), last))
        merged: list[tuple[int, int]] = []
        for first, last in sorted(set(out)):
            if merged and first >= 0 and first <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], last))
            else:
                merged.append((first, last))
        return merged

    def resolve(self, count: int, where: str) -> list[int]:
        """The episodes as a list, after checking every one against a store of `count` episodes (`where`
        names it in the error line); only then expanded, so the list holds at most `count` episodes."""
        missing = self.missing(count)
        if missing:
            shown = ", ".join(_show_range(a, b) for a, b in missing[: self.SHOWN])
            more = len(missing) - self.SHOWN
            shown += f", ... ({more} more)" if more > 0 else ""
            has = "none" if count == 0 else f"{count}: {_show_range(0, count - 1)}"
            raise XWAMError(f"--episodes: {where} has no episode(s) [{shown}] (the store has {has})")
        return list(self)


def _show_range(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def parse_episodes(text: str | None) -> EpisodeRanges | None:
    """'3,4' or '0-2,7' -> the ranges of [3, 4] / [0, 1, 2, 7] (EpisodeRanges, not expanded); None/'' -> None."""
    if text is None or not text.strip():
        return None
    ranges: list[tuple[int, int]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                first, last = int(lo), int(hi)
                if last < first:
                    raise ValueError
                ranges.append((first, last))
            else:
                ranges.append((int(part), int(part)))
        except ValueError:
            raise _bad_episodes(text) from None
    if not ranges:  # ',' alone: no index at all
        raise _bad_episodes(text)
    return EpisodeRanges(ranges)


def _bad_episodes(text: str) -> XWAMError:
    shown = text if len(text) <= 60 else text[:57] + "..."
    return XWAMError(f"--episodes {shown!r}: expected episode indices like 3,4 or 0-2,7")


def _show_episodes(episodes: list[int] | EpisodeRanges | None) -> str | None:
    if episodes is None:
        return None
    if isinstance(episodes, EpisodeRanges):
        return str(episodes)
    return ",".join(map(str, episodes))


@dataclass
class InferOptions:
    checkpoint: Path = option(
        REQUIRED, "Checkpoint folder, or a run folder (its newest checkpoint).", flag="--ckpt", parse=Path
    )
    store: Path = option(REQUIRED, "Episode store to take the windows from.", flag="--data", parse=Path)
    out: Path = option(REQUIRED, "Run folder to create.", parse=Path)
    episodes: list[int] | EpisodeRanges | None = option(
        None,
        "Episodes, e.g. 3,4 or 0-2. Default: the checkpoint's held-out episodes if this is its training "
        "store, else all.",
        parse=parse_episodes,
        show=_show_episodes,
    )
    mode: str = option("world", "'world' (actions + future RGB-D) or 'policy' (actions only, fast).")
    actions: str = option(
        "sampled",
        "World mode: 'sampled' (the model's own, as it acts) or 'recorded' (the future RGB-D given the "
        "episode's actions and states: the action-conditioned world model; no action metrics).",
    )
    windows_per_episode: int = option(4, "Windows per episode, evenly spaced.")
    batch_size: int = option(1, "Windows per model call (latency is per window).")
    seed: int = option(0, "Noise seed, 0 to 2**64 - 1; the same seed gives the same predictions.")
    num_steps_video: int | None = option(None, "Video denoising steps (default: the checkpoint's).")
    num_steps_action: int | None = option(None, "Action/state denoising steps (default: the checkpoint's).")
    action_noise_scale: float | None = option(
        None,
        "Scale of the noise the actions and states start from: 1 samples, 0 starts from its mean "
        "(default: the checkpoint's inference.action_noise_scale).",
    )
    videos: bool = option(True, "Write the side-by-side mp4 per view (world mode).")
    overwrite: bool = option(False, "Replace an existing run folder.", flag="--overwrite")
    command: str = ""  # the command line that made the run (recorded in its manifest)

    def command_line(self) -> str:
        """`xwam infer` with every option spelled out: rerunning it gives the same run."""
        args = ["xwam", "infer"]
        for f in fields(self):
            if "help" not in f.metadata:
                continue
            value = getattr(self, f.name)
            show = f.metadata["show"]
            value = show(value) if show is not None else value
            flag = flag_of(f)
            if isinstance(value, bool):
                if f.metadata["flag"] is not None:  # a plain switch: present or absent
                    args += [flag] if value else []
                else:
                    args.append(flag if value else f"--no-{flag[2:]}")
            elif value is not None:
                args += [flag, str(value)]
        return shlex.join(args)


def flag_of(f: Any) -> str:
    """A field's command-line flag: its own, or --field-name."""
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")
