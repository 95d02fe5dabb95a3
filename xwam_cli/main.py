"""The `xwam` command line: thin typer commands over xwam_core."""

from __future__ import annotations

import typer

from xwam_cli import convert, evaluate, infer, prepare, reconstruct, train

app = typer.Typer(
    name="xwam",
    help="Unified 4D world-action models (X-WAM): robot episodes -> actions + future multi-view RGB-D.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


@app.callback()
def main() -> None:
    """Unified 4D world-action models (X-WAM): robot episodes -> actions + future multi-view RGB-D."""


app.command(name="prepare", epilog=prepare.EXAMPLES)(prepare.prepare)
app.command(name="pretrain", epilog=train.EXAMPLES)(train.pretrain)
app.command(name="finetune", epilog=train.FINETUNE_EXAMPLES)(train.finetune)
app.command(name="infer", epilog=infer.EXAMPLES)(infer.infer)
app.command(name="reconstruct", epilog=reconstruct.EXAMPLES)(reconstruct.reconstruct)
app.command(name="evaluate", epilog=evaluate.EXAMPLES)(evaluate.evaluate)
app.command(name="convert", epilog=convert.EXAMPLES)(convert.convert)


if __name__ == "__main__":
    app()
