"""The options of one inference run, each defined once: its type, default, help and flag.

`xwam infer`'s command-line options are generated from these fields (xwam_cli.common.options_command),
the command line a run records comes from them (`InferOptions.command_line`), and the library takes the
same dataclass. Nothing here imports torch, so `xwam infer --help` stays instant.
"""

from __future__ import annotations

import shlex
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


def parse_episodes(text: str | None) -> list[int] | None:
    """'3,4' or '0-2,7' -> [3, 4] / [0, 1, 2, 7]; None/'' -> None."""
    if text is None or not text.strip():
        return None
    out: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                first, last = int(lo), int(hi)
                if last < first:
                    raise ValueError
                out.extend(range(first, last + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise XWAMError(f"--episodes {text!r}: expected episode indices like 3,4 or 0-2,7") from None
    return list(dict.fromkeys(out))


def _show_episodes(episodes: list[int] | None) -> str | None:
    return None if episodes is None else ",".join(map(str, episodes))


@dataclass
class InferOptions:
    checkpoint: Path = option(
        REQUIRED, "Checkpoint folder, or a run folder (its newest checkpoint).", flag="--ckpt", parse=Path
    )
    store: Path = option(REQUIRED, "Episode store to take the windows from.", flag="--data", parse=Path)
    out: Path = option(REQUIRED, "Run folder to create.", parse=Path)
    episodes: list[int] | None = option(
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
    seed: int = option(0, "Noise seed; the same seed gives the same predictions.")
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
