"""`xwam convert SOURCE PATH --out CKPT`: checkpoints from elsewhere -> an xwam checkpoint folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from xwam_cli.common import console, user_errors

EXAMPLES = """
[bold]Examples[/]

  xwam convert xwam-v0 out/demo/run --out out/demo/ckpt      # a checkpoint of an older xwam
"""


@user_errors
def convert(
    source: Annotated[
        str, typer.Argument(help="What PATH holds: 'xwam-v0' (a checkpoint of xwam before format 1).")
    ],
    path: Annotated[Path, typer.Argument(help="The checkpoint (or run folder) to convert.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The xwam checkpoint folder to write.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out folder.")] = False,
) -> None:
    """Write an xwam checkpoint folder (format 1) that infer, evaluate, finetune --init and the Policy load.

    The folder is written under a temporary name and renamed when complete.
    """
    from xwam_core.convert import SOURCES, convert_xwam_v0
    from xwam_core.errors import XWAMError

    if source not in SOURCES:
        raise XWAMError(f"convert {source!r}: expected one of {', '.join(SOURCES)}")
    written = convert_xwam_v0(path, out, overwrite=overwrite)
    console.print(f"checkpoint: {written}")
