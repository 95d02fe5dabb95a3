"""Checkpoints from elsewhere -> an xwam checkpoint folder (xwam_core.checkpoint, format 1).

    xwam convert xwam-v0 OLD_CHECKPOINT --out NEW     checkpoints written by xwam before format 1
    xwam convert xwam-release EXP_DIR --wan WAN_DIR --prompts FILE --out NEW
                                                      the authors' released checkpoints (convert_release.py)

An xwam-v0 checkpoint is a folder with model/, text.json (+ text.safetensors), layout.json, stats.json,
recipe.toml and trainer.json. Its recipe is read as plain TOML for the three things format 1 records
elsewhere (the model preset's codec, the inference schedule, the held-out episode count), never through
today's recipe schema, so renamed recipe keys do not matter. Its training state is not carried over:
the new folder is for inference and `xwam finetune --init`.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from xwam_core.checkpoint import MARKER, DataSpec, PolicyParts, export_checkpoint
from xwam_core.data.windows import WindowLayout
from xwam_core.errors import XWAMError
from xwam_core.models.codecs import describe_codec
from xwam_core.normalizer import Normalizer

SOURCES = ("xwam-v0", "xwam-release")


def convert_xwam_v0(source: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Read an xwam-v0 checkpoint folder (a run folder: its newest) and write a format-1 one at `out`."""
    from safetensors.torch import load_file

    from xwam_core.models.text import PrecomputedText, TaskEmbeddingText, TextConditioner
    from xwam_core.models.transformer import XWAMTransformer, upgrade_legacy_state_dict
    from xwam_core.schedule.inference import InferenceScheduleConfig

    path = _v0_folder(Path(source))
    layout = _json(path / "layout.json")
    stats = _json(path / "stats.json")
    text_meta = _json(path / "text.json")
    try:
        recipe = tomllib.loads((path / "recipe.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise XWAMError(f"{path / 'recipe.toml'}: unreadable ({e})") from None
    try:
        config = _json(path / "model" / "config.json")
        weights = load_file(path / "model" / "diffusion_pytorch_model.safetensors")
        model = XWAMTransformer.from_config(config)
        model.load_state_dict(upgrade_legacy_state_dict(weights), strict=True)  # demo heads became plug-ins
    except XWAMError:
        raise
    except Exception as e:
        raise XWAMError(f"{path / 'model'}: cannot load the model ({type(e).__name__}: {e})") from None
    tasks = list(layout["tasks"])
    text: TextConditioner
    if text_meta["kind"] == "task":
        text = TaskEmbeddingText(len(tasks), int(model.config["text_dim"]), int(text_meta["seq_len"]))
        text.load_state_dict(load_file(path / "text.safetensors"))
    else:  # UMT5 embeddings lived in a cache file beside the store: format 1 keeps the table itself
        text = PrecomputedText.load(text_meta["cache"])
    model_section = recipe.get("model", {})
    known = set(InferenceScheduleConfig.__dataclass_fields__)
    inference = InferenceScheduleConfig(
        **{k: v for k, v in recipe.get("inference", {}).items() if k in known}
    )
    action_names, state_names, fps = _store_facts(layout)
    parts = PolicyParts(
        model=model,
        text=text,
        codec=describe_codec(model_section.get("preset", "tiny"), model_section.get("vae", "")),
        normalizer=Normalizer.from_store_stats(stats, action_names, state_names),
        data=DataSpec(
            views=list(layout["views"]),
            image_size=(int(layout["image_size"][0]), int(layout["image_size"][1])),
            window=WindowLayout(int(layout["future_frames"]), int(layout["frame_stride"])),
            tasks=tasks,
            fps=fps,
            store=str(layout.get("store", "")),
            val_episodes=int(recipe.get("data", {}).get("val_episodes", 0)),
        ),
        inference=inference,
        recipe_toml=(path / "recipe.toml").read_text(),
        step=int(_json(path / "trainer.json").get("step", 0)),
    )
    return export_checkpoint(parts, out, overwrite=overwrite)


def _v0_folder(path: Path) -> Path:
    if not path.exists():
        raise XWAMError(f"{path}: not found")
    if (path / "checkpoints").is_dir() and not (path / "layout.json").is_file():
        steps = sorted(p for p in (path / "checkpoints").iterdir() if p.name.startswith("step-"))
        if not steps:
            raise XWAMError(f"{path}: run folder has no checkpoint")
        path = steps[-1]
    if (path / MARKER).is_file():
        raise XWAMError(f"{path}: already an xwam checkpoint (format 1); nothing to convert")
    if not (path / "layout.json").is_file() or not (path / "model" / "config.json").is_file():
        raise XWAMError(f"{path}: not an xwam-v0 checkpoint (expected layout.json and model/config.json)")
    return path


def _store_facts(layout: dict[str, Any]) -> tuple[list[str], list[str], float | None]:
    """(action names, state names, fps) from the training store when it is still there (v0 checkpoints
    did not record them), else numbered names and no fps."""
    a_dim, s_dim = int(layout["action_dim"]), int(layout["state_dim"])
    try:
        info = json.loads((Path(layout["store"]) / "meta" / "info.json").read_text())
        a = list(info["features"]["action"]["names"])
        s = list(info["features"]["observation.state"]["names"])
        if len(a) == a_dim and len(s) == s_dim:
            return a, s, float(info["fps"])
    except (OSError, KeyError, TypeError, ValueError):
        pass
    return [f"action_{i}" for i in range(a_dim)], [f"state_{i}" for i in range(s_dim)], None


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise XWAMError(f"{path.parent}: lacks {path.name}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise XWAMError(f"{path}: not valid JSON ({e})") from None
