"""Tiny checkpoints and run folders for the infer / reconstruct / evaluate / sim tests, built once per session.

pytest builds a fixture once per module that imports it, so the builders memoise on the session's base
temporary folder: every test file gets the same store, checkpoint and run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from tests import geometry_scene
from tests.conftest import SyntheticSource, write_store
from xwam_core.runs import RUN_FORMAT

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny_cpu.toml"
runner = CliRunner()
_built: dict[str, Any] = {}
# the names of Meta-World's 8-D hand state (xwam_core.data.sources.metaworld.STATE_NAMES): the closed
# loop picks the state it builds from a checkpoint's state names
MW_HAND_STATE = ("ee_x", "ee_y", "ee_z", "ee_qw", "ee_qx", "ee_qy", "ee_qz", "gripper_opening")


def _base(factory: pytest.TempPathFactory) -> Path:
    path = factory.getbasetemp() / "xwam-runs"
    path.mkdir(exist_ok=True)
    return path


def tiny_overrides(store: Path, out: Path, steps: int = 2, model: str = "") -> list[str]:
    """--set overrides of the tiny recipe for a 2-block model trained `steps` steps on `store`;
    `model`: more model.overrides, e.g. "depth_condition = true"."""
    return [
        f"data.store={store}",
        "data.future_frames=4",
        "data.frame_stride=2",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.val_episodes=1",
        "model.overrides={num_layers = 2, num_depth_blocks = 1" + (f", {model}" if model else "") + "}",
        f"train.max_steps={steps}",
        f"train.checkpoint_every={steps}",
        "train.val_every=1000",
        "train.warmup_steps=1",
        f"train.out={out}",
        "inference.num_steps_video=2",
        "inference.num_steps_action=2",
    ]


def train_tiny(store: Path, out: Path, steps: int = 2, model: str = "") -> Path:
    """A tiny 2-block model trained `steps` steps (see tiny_overrides); returns its checkpoint."""
    from xwam_core.recipe import load_recipe
    from xwam_core.train import train

    return train(load_recipe(TINY, tiny_overrides(store, out, steps, model))).checkpoint


def tiny_checkpoint(factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(store, checkpoint): 3 synthetic episodes of 14 frames, views a/b at 32x32, depth and cameras;
    windows of 4 future frames at stride 2 (8 actions); the last episode held out."""
    if "ckpt" not in _built:
        base = _base(factory)
        store = base / "store"
        write_store(store, SyntheticSource(episodes=3, length=14, size=(32, 32), views=("a", "b")))
        _built["ckpt"] = (store, train_tiny(store, base / "train"))
    return _built["ckpt"]


def metaworld_checkpoint(factory: pytest.TempPathFactory) -> Path:
    """A checkpoint shaped for Meta-World (views corner2 + gripperPOV at 64x64, task reach-v3, the 8-D
    hand state by name, 4-D actions), trained 2 steps on synthetic episodes: the closed loop needs the
    shapes, not skill."""
    if "mw" not in _built:
        base = _base(factory)
        store = base / "mw-store"
        source = SyntheticSource(
            episodes=2,
            length=12,
            size=(64, 64),
            views=("corner2", "gripperPOV"),
            tasks=("reach-v3",),
            state_names=MW_HAND_STATE,
        )
        write_store(store, source)
        _built["mw"] = train_tiny(store, base / "mw-train")
    return _built["mw"]


def world_run(factory: pytest.TempPathFactory) -> Path:
    """A world-mode run of the tiny checkpoint on its held-out episode (2 windows)."""
    if "world" not in _built:
        store, ckpt = tiny_checkpoint(factory)
        out = _base(factory) / "run-world"
        result = runner.invoke(
            app(),
            [
                "infer",
                "--ckpt",
                str(ckpt),
                "--data",
                str(store),
                "--out",
                str(out),
                "--windows-per-episode",
                "2",
            ],
        )
        assert result.exit_code == 0, result.output
        _built["world"] = out
    return _built["world"]


def other_store(factory: pytest.TempPathFactory, name: str, **kwargs: Any) -> Path:
    """Another synthetic store with the checkpoint's views, size and tasks (e.g. depth=False, cameras=False)."""
    key = f"store-{name}"
    if key not in _built:
        path = _base(factory) / key
        options = dict(episodes=1, length=10, size=(32, 32), views=("a", "b"), seed=7)
        write_store(path, SyntheticSource(**{**options, **kwargs}))
        _built[key] = path
    return _built[key]


def scene_run(path: Path, height: int = 60, width: int = 80) -> Path:
    """A hand-made world-mode run whose prediction IS the analytic scene (2 cameras, 1 window, 2 future steps)."""
    scene = geometry_scene.render(height, width, focal=110.0)
    n_views, t = 2, 3
    depth = np.stack([np.stack([d.astype(np.float32)] * t) for d in scene.depths])[None]  # (1, V, T, H, W)
    rgb = np.stack([np.stack([c] * t) for c in scene.rgbs])[None]
    Ks = np.broadcast_to(np.stack(scene.Ks)[:, None], (n_views, t, 3, 3))[None].astype(np.float32)
    poses = np.broadcast_to(np.stack(scene.poses)[:, None], (n_views, t, 4, 4))[None].astype(np.float32)
    arrays = {
        "episode_index": np.array([0]),
        "frame_index": np.array([0]),
        "task": np.array(["scene"]),
        "pred_actions": np.zeros((1, 8, 4), np.float32),
        "true_actions": np.zeros((1, 8, 4), np.float32),
        "pred_states": np.zeros((1, t, 8), np.float32),
        "true_states": np.zeros((1, t, 8), np.float32),
        "latency_s": np.array([0.1]),
        "mean_action": np.zeros(4, np.float32),
        "pred_rgb": rgb,
        "true_rgb": rgb,
        "pred_depth": depth,
        "true_depth": depth,
        "intrinsics": Ks,
        "extrinsics": poses,
        "pred_extrinsics": poses,
    }
    manifest = {
        "xwam_run": RUN_FORMAT,
        "mode": "world",
        "views": ["left", "right"],
        "store": "scene",
        "store_has_depth": True,
        "store_has_cameras": True,
        "max_depth": 4.5,
        "episodes": [0],
        "future_frames": 2,
    }
    path.mkdir(parents=True)
    np.savez(path / "predictions.npz", **arrays)
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def app() -> Any:
    from xwam_cli.main import app as xwam_app

    return xwam_app


def one_line_error(result: Any, *needles: str) -> None:
    """Non-zero exit, exactly one 'error:' line, no traceback, every needle in the output."""
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output, result.output
    flat = result.output.replace("\n", " ")
    for needle in needles:
        assert needle in flat, result.output


def no_temporaries(folder: Path) -> None:
    """No half-written temporary folder or file left behind in `folder`."""
    left = [p.name for p in folder.iterdir() if ".tmp" in p.name or ".old-" in p.name]
    assert not left, left
