"""`xwam convert SOURCE PATH --out CKPT`: checkpoints from elsewhere -> an xwam checkpoint folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from xwam_cli.common import console, user_errors

EXAMPLES = """
[bold]Examples[/]

  xwam convert xwam-v0 out/demo/run --out out/demo/ckpt      # a checkpoint of an older xwam
  xwam convert xwam-release experiments/robotwin_sft --wan checkpoints/Wan2.2-TI2V-5B \\
      --prompts prompts.txt --views head,left_wrist,right_wrist --out ckpt/robotwin
                                                             # the X-WAM authors' released checkpoints
"""

RELEASE = "xwam-release only"


@user_errors
def convert(
    source: Annotated[
        str,
        typer.Argument(
            help="What PATH holds: 'xwam-v0' (a checkpoint of xwam before format 1) or 'xwam-release' "
            "(an experiment folder of the X-WAM authors' code: config.yaml + checkpoints/)."
        ),
    ],
    path: Annotated[Path, typer.Argument(help="The checkpoint, run folder or experiment folder to convert.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The xwam checkpoint folder to write.")],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out folder.")] = False,
    wan: Annotated[
        str | None,
        typer.Option(
            "--wan",
            help=f"{RELEASE}: the Wan2.2 model the release was trained from (its config.json, or a diffusers "
            "folder); gives the attention heads.",
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(
            "--name", help=f"{RELEASE}: which checkpoints/<name>.ckpt (default: last, else the newest)."
        ),
    ] = None,
    prompts: Annotated[
        Path | None, typer.Option("--prompts", help=f"{RELEASE}: a text file of task prompts, one per line.")
    ] = None,
    prompts_from: Annotated[
        Path | None,
        typer.Option("--prompts-from", help=f"{RELEASE}: take the task prompts of this xwam store."),
    ] = None,
    views: Annotated[
        str | None,
        typer.Option(
            "--views",
            help=f"{RELEASE}: the model's view names, comma-separated, in the release's order (the training "
            "data's views sorted by name); default view_0,view_1,view_2.",
        ),
    ] = None,
    text_encoder: Annotated[
        str | None,
        typer.Option(
            "--text-encoder",
            help=f"{RELEASE}: UMT5 (a Wan diffusers folder with tokenizer/ and text_encoder/, or a hub id); "
            "default --wan when it has them, else Wan-AI/Wan2.2-TI2V-5B-Diffusers.",
        ),
    ] = None,
    vae: Annotated[
        str | None,
        typer.Option(
            "--vae",
            help=f"{RELEASE}: the Wan2.2 VAE the checkpoint names; default --wan's vae/, else the hub id.",
        ),
    ] = None,
    codec: Annotated[
        str,
        typer.Option(
            "--codec",
            help=f"{RELEASE}: 'wan-vae' (the release's), or 'pixel:SPATIAL:TEMPORAL' for tiny test models.",
        ),
    ] = "wan-vae",
    dtype: Annotated[
        str | None,
        typer.Option(
            "--dtype", help=f"{RELEASE}: float32, bfloat16 or float16 (default: the source's, bf16)."
        ),
    ] = None,
    gripper: Annotated[
        str,
        typer.Option(
            "--gripper",
            help=f"{RELEASE}: 'plain' (delta gripper, normalised), 'flipped' (raw controller gripper, sign "
            "flipped, as the release's RoboCasa fine-tune) or 'auto' (flipped for one-arm statistics).",
        ),
    ] = "auto",
    guidance_scale: Annotated[
        float,
        typer.Option(
            "--guidance-scale",
            help=f"{RELEASE}: classifier-free guidance for inference.json; the release's cfg=c (0 = off) "
            "is c here (1 = off).",
        ),
    ] = 1.0,
    allow_unsafe_pickle: Annotated[
        bool,
        typer.Option(
            "--allow-unsafe-pickle",
            help=f"{RELEASE}: read a checkpoint torch's safe loader refuses. Unpickling runs code from the "
            "file: only for files you trust.",
        ),
    ] = False,
) -> None:
    """Write an xwam checkpoint folder (format 1) that infer, evaluate, finetune --init and the Policy load.

    The folder is written under a temporary name and renamed when complete.
    """
    from xwam_core.convert import SOURCES, convert_xwam_v0
    from xwam_core.errors import XWAMError

    if source not in SOURCES:
        raise XWAMError(f"convert {source!r}: expected one of {', '.join(SOURCES)}")
    if source == "xwam-v0":
        given = {
            "--wan": wan,
            "--name": name,
            "--prompts": prompts,
            "--prompts-from": prompts_from,
            "--views": views,
            "--text-encoder": text_encoder,
            "--vae": vae,
            "--dtype": dtype,
            "--codec": None if codec == "wan-vae" else codec,
            "--gripper": None if gripper == "auto" else gripper,
            "--guidance-scale": None if guidance_scale == 1.0 else guidance_scale,
            "--allow-unsafe-pickle": allow_unsafe_pickle or None,
        }
        extra = [flag for flag, value in given.items() if value is not None]
        if extra:
            raise XWAMError(f"convert xwam-v0: {extra[0]} is for xwam-release only")
        written = convert_xwam_v0(path, out, overwrite=overwrite)
        console.print(f"checkpoint: {written}")
        return

    from xwam_core.convert_release import convert_xwam_release

    if wan is None:
        raise XWAMError(
            "convert xwam-release needs --wan WAN_DIR (the Wan2.2 model the release was trained from)"
        )
    result = convert_xwam_release(
        path,
        out,
        wan=wan,
        prompts=prompts,
        prompts_from=prompts_from,
        name=name,
        views=views.split(",") if views is not None else None,
        text_encoder=text_encoder,
        vae=vae,
        codec=codec,
        dtype=dtype,
        gripper=gripper,
        guidance_scale=guidance_scale,
        allow_unsafe_pickle=allow_unsafe_pickle,
        overwrite=overwrite,
        log=lambda message: console.print(message, markup=False, highlight=False),
    )
    for note in result.notes:
        console.print(f"note: {note}", markup=False, highlight=False)
    console.print(
        f"converted {result.tensors} tensors ({result.skipped} text-encoder/VAE tensors skipped), "
        f"{result.dtype}, gripper {result.gripper}, views {', '.join(result.views)}, {result.tasks} task(s)",
        markup=False,
        highlight=False,
    )
    console.print(f"checkpoint: {result.path}")
