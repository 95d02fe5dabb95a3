"""scripts/bc_budget.py (docs/demo.md's updates-vs-goal-following table): one JSON line per UPDATESxBATCH pair
with the goal-following r per task and axis (and, with --success, the closed-loop rate with its interval), and
one line for a bad argument."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("metaworld")

from tests.conftest import SyntheticSource, write_store
from tests.run_fixtures import MW_HAND_STATE

pytestmark = pytest.mark.sim

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bc_budget.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600
    )


def _store(tmp_path: Path, tasks: tuple[str, ...] = ("reach-v3",), episodes: int = 3) -> Path:
    """A tiny synthetic store with Meta-World's hand state (16x16, one view)."""
    store = tmp_path / "store"
    source = SyntheticSource(
        episodes=episodes,
        length=12,
        size=(16, 16),
        views=("corner2",),
        tasks=tasks,
        state_names=MW_HAND_STATE,
    )
    write_store(store, source)
    return store


def _rows(done: subprocess.CompletedProcess[str]) -> list[dict]:
    """The script's --json rows (other lines, e.g. progress, skipped)."""
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_one_json_line_per_run(tmp_path):
    store = _store(tmp_path)
    done = _run(str(store), "--runs", "5x4,10x2", "--episodes", "3", "--val-episodes", "1", "--json")
    assert done.returncode == 0, done.stderr
    rows = _rows(done)
    assert [(r["updates"], r["batch"]) for r in rows] == [(5, 4), (10, 2)]
    for row in rows:
        r = row["reach-v3"]
        assert len(r) == 3 and all(v is None or -1.0 <= v <= 1.0 for v in r)
        assert row["loss"] >= 0.0


def test_a_learning_rate_and_rollouts_with_their_interval(tmp_path):
    store = _store(tmp_path, tasks=("reach-v3", "push-v3"))
    done = _run(
        str(store), "--runs", "5x4x3e-3", "--tasks", "push-v3", "--episodes", "3", "--val-episodes", "1",
        "--success", "--actions-per-query", "8", "--bc-seed", "1", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (row,) = _rows(done)
    assert (row["updates"], row["batch"], row["lr"], row["bc_seed"]) == (5, 4, 3e-3, 1)
    assert "reach-v3" not in row  # only the task asked for
    wins, n, low, high = row["push-v3_success"]
    assert n == 3 and 0 <= wins <= 3
    assert 0.0 <= low <= wins / n <= high <= 1.0 and high - low > 0.3  # 3 starts: a wide interval


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--runs", "5x4,lots"], "--runs item 'lots': expected UPDATESxBATCH or UPDATESxBATCHxLR"),
        (["--runs", "5x4x-1"], "--runs item '5x4x-1': expected UPDATESxBATCH or UPDATESxBATCHxLR"),
        (["--runs", "5x4xfast"], "--runs item '5x4xfast': expected"),
        (["--runs", "5x4x1e-3x2"], "--runs item '5x4x1e-3x2': expected"),
        (["--actions-per-query", "40"], "--actions-per-query 40: expected 1 to 32"),
        (["--episodes", "0"], "--episodes 0: expected at least 1"),
    ],
)
def test_bad_arguments_are_one_line(tmp_path, args, needle):
    done = _run(str(tmp_path), *args)
    assert done.returncode != 0
    assert needle in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_task_not_in_the_store_is_one_line(tmp_path):
    store = _store(tmp_path, episodes=2)
    done = _run(str(store), "--tasks", "push-v3")
    assert done.returncode != 0
    assert f"--tasks 'push-v3' is not a task of {store}" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_the_seed_changes_the_training(tmp_path):
    store = _store(tmp_path)
    losses = []
    for seed in ("0", "1", "0"):
        done = _run(
            str(store), "--runs", "5x4", "--episodes", "3", "--val-episodes", "1", "--bc-seed", seed, "--json"
        )
        assert done.returncode == 0, done.stderr
        (row,) = _rows(done)
        losses.append(row["loss"])
    assert losses[0] == losses[2] != losses[1]  # the same seed repeats, another one differs
