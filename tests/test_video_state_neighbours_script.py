"""scripts/video_state_neighbours.py (docs/demo.md's video bound from the state): the nearest same-task
windows of the other episodes, their mean future scored beside the model; one error line for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.conftest import SyntheticSource, write_store
from xwam_core.data.reader import EpisodeStore
from xwam_core.data.windows import WindowDataset, WindowLayout

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "video_state_neighbours.py"
VIEWS = ["front", "side"]
LAYOUT = WindowLayout(future_frames=2, frame_stride=2)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def _window(store: EpisodeStore, episode: int, frame: int) -> dict:
    dataset = WindowDataset(store, LAYOUT, views=VIEWS, episodes=[episode], normalize=False)
    items = (dataset[i] for i in range(len(dataset)))
    return next(item for item in items if item["frame_index"] == frame)


def _fake_run(tmp_path: Path) -> Path:
    """A run over held-out episode 3 (push) whose two windows are copies of windows of episodes 1 (push)
    and 0 (reach), the second relabelled push: its nearest push window is then not itself."""
    store_path = tmp_path / "store"
    write_store(store_path, SyntheticSource(episodes=4, length=16, size=(16, 16), views=tuple(VIEWS)))
    store = EpisodeStore(store_path)
    assert [store.tasks[i] for i in store.episodes.task_index] == ["reach", "push", "reach", "push"]
    windows = [_window(store, 1, 4), _window(store, 0, 4)]
    rgb = np.stack([w["rgb"] for w in windows])
    pred = rgb.copy()
    pred[:, :, 1:] = rgb[:, :, :1]  # a model that repeats the current frame
    run = tmp_path / "run"
    run.mkdir()
    np.savez(
        run / "predictions.npz",
        true_rgb=rgb,
        pred_rgb=pred,
        mean_rgb=rgb.mean(axis=0).astype(np.float32),
        true_states=np.stack([w["states"] for w in windows]),
        task=np.array(["push", "push"]),
    )
    manifest = {
        "store": str(store_path),
        "episodes": [3],
        "views": VIEWS,
        "future_frames": LAYOUT.future_frames,
        "frame_stride": LAYOUT.frame_stride,
    }
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


def _table(stdout: str) -> dict[str, list[float]]:
    rows = {}
    for line in stdout.splitlines()[2:]:
        name, values = line[:22].strip(), line[22:].split()
        rows[name] = [float(x) for x in values]
    return rows


def test_the_nearest_window_of_the_same_task_is_drawn(tmp_path: Path):
    run = _fake_run(tmp_path)
    result = _run(str(run), "--k", "1,2")
    assert result.returncode == 0, result.stderr
    rows = _table(result.stdout)
    assert list(rows) == ["model", "repeat frame", "mean frame", "nearest 1 states", "nearest 2 states"]
    assert rows["model"] == rows["repeat frame"]
    # window 0 is episode 1's own window: found exactly (PSNR capped at 100); window 1 is a reach window
    # relabelled push, so its nearest push window differs from its truth: the mean is below the cap
    exact = 100.0
    assert rows["nearest 1 states"][0] < exact
    assert all(len(v) == 1 + len(VIEWS) for v in rows.values())
    first_line = result.stdout.splitlines()[0]
    assert first_line.startswith("2 windows, ") and "of 3 other episodes" in first_line

    # scoring only window 0 shows the exact recovery
    with np.load(run / "predictions.npz") as data:
        arrays = {k: data[k][:1] for k in data.files if k != "mean_rgb"}
        arrays["mean_rgb"] = data["mean_rgb"]
    np.savez(run / "predictions.npz", **arrays)
    rows = _table(_run(str(run), "--k", "1").stdout)
    assert rows["nearest 1 states"] == [exact] * (1 + len(VIEWS))


def test_bad_input_is_one_line(tmp_path: Path):
    result = _run(str(tmp_path))
    assert result.returncode != 0
    assert (
        result.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'manifest.json'}: not found")
    )
    run = _fake_run(tmp_path)
    result = _run(str(run), "--k", "0")
    assert result.returncode != 0 and "--k '0': expected positive integers" in result.stderr
    with np.load(run / "predictions.npz") as data:
        arrays = {k: data[k] for k in data.files if k != "mean_rgb"}
    np.savez(run / "predictions.npz", **arrays)  # a policy-mode-like run without the mean frame
    result = _run(str(run))
    assert result.returncode != 0
    assert (
        result.stderr.strip().splitlines()[-1].endswith("no mean_rgb; expected a world-mode run with states")
    )
