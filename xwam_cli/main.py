"""The `xwam` command line: thin typer commands over xwam_core."""

from __future__ import annotations

from typing import Annotated

import typer

from xwam_cli import ablate, convert, evaluate, infer, prepare, reconstruct, serve, train
from xwam_cli.common import DEBUG_ENV, XWAMGroup, set_debug

app = typer.Typer(
    name="xwam",
    cls=XWAMGroup,
    help="Unified 4D world-action models (X-WAM): robot episodes -> actions + future multi-view RGB-D.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


@app.callback()
def main(
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            help=f"On an error, print the full traceback before the one-line message (or set {DEBUG_ENV}=1).",
        ),
    ] = False,
) -> None:
    """Unified 4D world-action models (X-WAM): robot episodes -> actions + future multi-view RGB-D."""
    set_debug(debug)


app.command(name="prepare", epilog=prepare.EXAMPLES)(prepare.prepare)
app.command(name="merge", epilog=prepare.MERGE_EXAMPLES)(prepare.merge)
app.command(name="pretrain", epilog=train.EXAMPLES)(train.pretrain)
app.command(name="finetune", epilog=train.FINETUNE_EXAMPLES)(train.finetune)
app.command(name="infer", epilog=infer.EXAMPLES)(infer.infer)
app.command(name="reconstruct", epilog=reconstruct.EXAMPLES)(reconstruct.reconstruct)
app.command(name="evaluate", epilog=evaluate.EXAMPLES)(evaluate.evaluate)
app.command(name="convert", epilog=convert.EXAMPLES)(convert.convert)
app.command(name="ablate", epilog=ablate.EXAMPLES)(ablate.ablate)
app.command(name="serve", epilog=serve.EXAMPLES)(serve.serve)
app.command(name="broker", epilog=serve.BROKER_EXAMPLES)(serve.broker)


if __name__ == "__main__":
    app()
