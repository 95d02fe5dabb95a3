"""Checkpoints from elsewhere -> an xwam checkpoint folder (xwam_core.checkpoint, format 1).

    xwam convert xwam-v0 OLD_CHECKPOINT --out NEW     checkpoints written by xwam before format 1
    xwam convert xwam-release EXP_DIR --wan WAN_DIR --prompts FILE --out NEW
                                                      the authors' released checkpoints (convert_release.py)

An xwam-v0 checkpoint is a folder with model/, text.json (+ text.safetensors), layout.json, stats.json,
recipe.toml and trainer.json. Its recipe is read as plain TOML for the three things format 1 records
elsewhere (the model preset's codec, the inference schedule, the held-out episode count), never through
today's recipe schema as a whole, so renamed recipe keys do not matter; the keys it does read are checked
against today's types and ranges. Its training state is not carried over: the new folder is for inference
and `xwam finetune --init`. Every file is checked before anything is written: bad input is one error line
naming the file, the key and the value.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

from xwam_core.checkpoint import MARKER, DataSpec, PolicyParts, export_checkpoint
from xwam_core.data.windows import WindowLayout
from xwam_core.errors import RecipeError, XWAMError, first_line
from xwam_core.models.codecs import describe_codec
from xwam_core.normalizer import Normalizer

SOURCES = ("xwam-v0", "xwam-release")
V0_TEXT_KINDS = ("task", "umt5")  # what xwam-v0 wrote (model.text); "precomputed" is format 1's name for umt5


def convert_xwam_v0(source: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    """Read an xwam-v0 checkpoint folder (a run folder: its newest) and write a format-1 one at `out`."""
    path = _v0_folder(Path(source))
    # the small files first, every key checked, before the model is loaded
    layout_file = path / "layout.json"
    layout = _json_object(layout_file)
    views = _str_list(layout, "views", layout_file)
    tasks = _str_list(layout, "tasks", layout_file)
    image_size = _image_size(layout, layout_file)
    window = WindowLayout(
        _int(layout, "future_frames", layout_file, 1), _int(layout, "frame_stride", layout_file, 1)
    )
    action_dim = _int(layout, "action_dim", layout_file, 1)
    state_dim = _int(layout, "state_dim", layout_file, 1)
    store = layout.get("store", "")
    if not isinstance(store, str):
        raise XWAMError(f"{layout_file}: 'store' is {store!r}, expected the training store's path (a string)")
    stats_file = path / "stats.json"
    stats = _json_object(stats_file)
    text_file = path / "text.json"
    text_meta = _json_object(text_file)
    kind = text_meta.get("kind")
    if kind not in (*V0_TEXT_KINDS, "precomputed"):
        raise XWAMError(
            f"{text_file}: lacks 'kind' (expected 'task' or 'umt5')"
            if "kind" not in text_meta
            else f"{text_file}: 'kind' is {kind!r}, expected 'task' or 'umt5'"
        )
    trainer_file = path / "trainer.json"
    step = _int(_json_object(trainer_file), "step", trainer_file, 0, default=0)
    recipe_file = path / "recipe.toml"
    recipe_text, codec, inference, val_episodes = _v0_recipe(recipe_file, window)
    action_names, state_names, fps = _store_facts(store, action_dim, state_dim)
    normalizer = _normalizer(stats, action_names, state_names, stats_file)

    model = _v0_model(path / "model")
    text = _v0_text(path, text_meta, kind, tasks, int(model.config["text_dim"]))
    parts = PolicyParts(
        model=model,
        text=text,
        codec=codec,
        normalizer=normalizer,
        data=DataSpec(
            views=views,
            image_size=image_size,
            window=window,
            tasks=tasks,
            fps=fps,
            store=store,
            val_episodes=val_episodes,
        ),
        inference=inference,
        recipe_toml=recipe_text,
        step=step,
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


def _v0_recipe(file: Path, window: WindowLayout) -> tuple[str, dict[str, Any], Any, int]:
    """(recipe.toml's text, the codec description, the inference settings, data.val_episodes) from the
    v0 recipe: only the keys format 1 records are read, each through today's recipe types and ranges."""
    from xwam_core.recipe import Recipe, recipe_from_dict
    from xwam_core.schedule.inference import InferenceScheduleConfig

    try:
        text = file.read_text(encoding="utf-8")
        recipe = tomllib.loads(text)
    except FileNotFoundError:
        raise XWAMError(f"{file.parent}: lacks {file.name}") from None
    except UnicodeDecodeError:
        raise XWAMError(f"{file}: not UTF-8 text; expected the run's recipe (TOML)") from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise XWAMError(f"{file}: unreadable ({e})") from None

    def picked(section: str, keys: set[str]) -> Any:
        table = recipe.get(section, {})  # not a table: recipe_from_dict names it
        return {k: v for k, v in table.items() if k in keys} if isinstance(table, dict) else table

    table = {
        "inference": picked("inference", set(InferenceScheduleConfig.__dataclass_fields__)),
        "data": picked("data", {"val_episodes"}),
        "model": picked("model", {"preset", "vae"}),
    }
    facts = recipe_from_dict(table, where=str(file), cls=Recipe)  # RecipeError: file, key, type
    inference = facts.inference
    try:
        inference.validate()
    except RecipeError as e:
        raise RecipeError(f"{file}: {e}") from None
    chunk = window.num_actions
    if inference.actions_per_query > chunk:
        raise RecipeError(
            f"{file}: inference.actions_per_query: expected an integer in [0, {chunk}] (0: the whole chunk of "
            f"{chunk} actions of layout.json's window), got {inference.actions_per_query}"
        )
    val_episodes = facts.data.val_episodes if "val_episodes" in table["data"] else 0
    if val_episodes < 0:
        raise RecipeError(f"{file}: data.val_episodes: expected an integer >= 0, got {val_episodes}")
    try:
        codec = describe_codec(facts.model.preset, facts.model.vae)
    except XWAMError as e:
        raise XWAMError(f"{file}: model.preset: {e}") from None
    return text, codec, inference, val_episodes


def _v0_model(folder: Path) -> Any:
    from safetensors.torch import load_file

    from xwam_core.models.transformer import XWAMTransformer, upgrade_legacy_state_dict

    try:
        config = _json_object(folder / "config.json")
        weights = load_file(folder / "diffusion_pytorch_model.safetensors")
        model = XWAMTransformer.from_config(config)
        model.load_state_dict(upgrade_legacy_state_dict(weights), strict=True)  # demo heads became plug-ins
    except XWAMError:
        raise
    except Exception as e:  # diffusers, safetensors and torch raise many kinds for a damaged folder
        raise XWAMError(f"{folder}: cannot load the model ({type(e).__name__}: {first_line(e)})") from None
    return model


def _v0_text(path: Path, meta: dict[str, Any], kind: str, tasks: list[str], text_dim: int) -> Any:
    """The text conditioner: learned task embeddings (text.safetensors) or the UMT5 cache text.json names."""
    from xwam_core.models.text import PrecomputedText, TaskEmbeddingText

    text_file = path / "text.json"
    if kind != "task":  # UMT5 embeddings lived in a cache file beside the store: format 1 keeps the table
        cache = meta.get("cache")
        if not isinstance(cache, str) or not cache.strip():
            raise XWAMError(
                f"{text_file}: 'cache' is {cache!r}, expected the path of the UMT5 embedding cache that "
                "kind 'umt5' reads (written by PrecomputedText.save)"
            )
        return PrecomputedText.load(cache)
    seq_len = _int(meta, "seq_len", text_file, 1)
    file = path / "text.safetensors"
    if not file.is_file():
        raise XWAMError(f"{path}: lacks text.safetensors (the task embeddings of text.json's kind 'task')")
    from safetensors.torch import load_file

    try:
        tensors = load_file(file)
    except Exception as e:  # safetensors raises its own error types for a damaged file
        raise XWAMError(f"{file}: unreadable ({type(e).__name__}: {first_line(e)})") from None
    text = TaskEmbeddingText(len(tasks), text_dim, seq_len)
    expected = tuple(text.embedding.shape)
    got = tensors.get("embedding")
    if got is None:
        raise XWAMError(
            f"{file}: lacks the tensor 'embedding' (holds {', '.join(sorted(tensors)) or 'none'})"
        )
    if tuple(got.shape) != expected:
        raise XWAMError(
            f"{file}: 'embedding' has shape {tuple(got.shape)}, expected {expected} (layout.json's "
            f"{len(tasks)} tasks + the empty prompt, text.json's seq_len {seq_len}, the model's text_dim "
            f"{text_dim})"
        )
    try:
        text.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise XWAMError(f"{file}: does not fit the task embeddings ({first_line(e)})") from None
    return text


def _normalizer(
    stats: dict[str, Any], action_names: list[str], state_names: list[str], file: Path
) -> Normalizer:
    for section in ("action", "observation.state"):
        table = stats.get(section, {})
        if not isinstance(table, dict):
            raise XWAMError(f"{file}: '{section}' is {_short(table)}, expected a table of statistics")
        for key in ("q01", "q99"):
            values = table.get(key)
            if values is not None and not (
                isinstance(values, list)
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            ):
                raise XWAMError(f"{file}: '{section}.{key}' is {_short(values)}, expected a list of numbers")
    try:
        return Normalizer.from_store_stats(stats, action_names, state_names)
    except XWAMError as e:
        raise XWAMError(
            f"{file}: {e}; layout.json gives action_dim {len(action_names)}, state_dim {len(state_names)}"
        ) from None


def _store_facts(store: str, a_dim: int, s_dim: int) -> tuple[list[str], list[str], float | None]:
    """(action names, state names, fps) from the training store when it is still there (v0 checkpoints
    did not record them), else numbered names and no fps."""
    if store:
        try:
            info = json.loads((Path(store) / "meta" / "info.json").read_text())
            a = list(info["features"]["action"]["names"])
            s = list(info["features"]["observation.state"]["names"])
            if len(a) == a_dim and len(s) == s_dim:
                return [str(n) for n in a], [str(n) for n in s], float(info["fps"])
        except (OSError, KeyError, TypeError, ValueError, AttributeError):
            pass
    return [f"action_{i}" for i in range(a_dim)], [f"state_{i}" for i in range(s_dim)], None


# ------------------------------------------------------------------------------------ checked JSON
def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise XWAMError(f"{path.parent}: lacks {path.name}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise XWAMError(f"{path}: not valid JSON ({e})") from None


def _json_object(path: Path) -> dict[str, Any]:
    data = _json(path)
    if not isinstance(data, dict):
        raise XWAMError(f"{path}: holds {_short(data)}, expected a JSON object")
    return data


def _int(table: dict[str, Any], key: str, file: Path, minimum: int, default: int | None = None) -> int:
    if key not in table and default is not None:
        return default
    if key not in table:
        raise XWAMError(f"{file}: lacks '{key}' (expected an integer >= {minimum})")
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise XWAMError(f"{file}: '{key}' is {_short(value)}, expected an integer >= {minimum}")
    return value


def _str_list(table: dict[str, Any], key: str, file: Path) -> list[str]:
    if key not in table:
        raise XWAMError(f"{file}: lacks '{key}' (expected a list of names)")
    value = table[key]
    if not (isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)):
        raise XWAMError(f"{file}: '{key}' is {_short(value)}, expected a non-empty list of names")
    return list(value)


def _image_size(table: dict[str, Any], file: Path) -> tuple[int, int]:
    value = table.get("image_size")
    if not (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)
    ):
        if "image_size" not in table:
            raise XWAMError(f"{file}: lacks 'image_size' (expected [height, width])")
        raise XWAMError(f"{file}: 'image_size' is {_short(value)}, expected [height, width] (integers >= 1)")
    return int(value[0]), int(value[1])


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
