"""scripts/bc_budget.py (docs/demo.md's updates-vs-goal-following table): one JSON line per UPDATESxBATCH pair
with the goal-following r per task and axis, and one line for a bad --runs."""

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


def test_one_json_line_per_run(tmp_path):
    store = tmp_path / "store"
    source = SyntheticSource(
        episodes=3,
        length=12,
        size=(16, 16),
        views=("corner2",),
        tasks=("reach-v3",),
        state_names=MW_HAND_STATE,
    )
    write_store(store, source)
    done = _run(str(store), "--runs", "5x4,10x2", "--episodes", "3", "--val-episodes", "1", "--json")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [(r["updates"], r["batch"]) for r in rows] == [(5, 4), (10, 2)]
    for row in rows:
        r = row["reach-v3"]
        assert len(r) == 3 and all(v is None or -1.0 <= v <= 1.0 for v in r)
        assert row["loss"] >= 0.0


def test_bad_runs_is_one_line(tmp_path):
    done = _run(str(tmp_path), "--runs", "5x4,lots")
    assert done.returncode != 0
    assert "--runs item 'lots': expected UPDATESxBATCH" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
