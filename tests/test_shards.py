"""Parallel, sharded and resumable prepare: N workers, N shards merged and a killed-then-continued
prepare all give the store a one-shot prepare writes.

"The same store" is compared as: meta/info.json, meta/stats.json, meta/tasks.parquet, the meta/episodes and
data parquet tables (every column, depth PNG bytes included), and every episode decoded from the store
(RGB from the videos, depth, cameras, state, action) array for array. Video files are compared decoded,
not byte for byte (the contract is the frames; here the bytes happen to be equal too).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tests.conftest import SyntheticSource, synthetic_builder, synthetic_episode
from xwam_cli.main import app
from xwam_core.data import sources
from xwam_core.data.conform import conform_episode, make_conform
from xwam_core.data.episode import Episode
from xwam_core.data.reader import EpisodeStore
from xwam_core.data.shards import PartsFolder, shard_episodes

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


class SlowSource(SyntheticSource):
    """SyntheticSource that takes its time per episode, or stops with Ctrl-C at episode `XWAM_TEST_STOP_AT`."""

    def episodes_at(self, indices: Sequence[int]) -> Iterator[Episode]:
        stop_at = int(os.environ.get("XWAM_TEST_STOP_AT", "-1"))
        for index, episode in zip(sorted(indices), super().episodes_at(indices), strict=True):
            if index == stop_at:
                raise KeyboardInterrupt
            time.sleep(float(os.environ.get("XWAM_TEST_SLEEP", "0")))
            yield episode


def slow_builder(cfg: object) -> SlowSource:
    return SlowSource(episodes=6, length=12, size=(32, 32))


BUILDERS = {"synthetic": synthetic_builder, "slow": slow_builder}
# the CLI in another process, with the test sources registered
CLI = """
import sys
from tests.test_shards import BUILDERS
from xwam_core.data import sources
sources.SOURCES.update(BUILDERS)
from xwam_cli.main import app
app(sys.argv[1:])
"""


@pytest.fixture(autouse=True)
def test_sources(monkeypatch):
    for name, builder in BUILDERS.items():
        monkeypatch.setitem(sources.SOURCES, name, builder)


def cli(*args: str, env: dict | None = None) -> subprocess.Popen:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-c", CLI, *args],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def ok(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def assert_same_store(a: Path, b: Path) -> None:
    for name in ("info.json", "stats.json"):
        assert json.loads((a / "meta" / name).read_text()) == json.loads((b / "meta" / name).read_text()), (
            name
        )
    for rel in (
        "meta/tasks.parquet",
        "meta/episodes/chunk-000/file-000.parquet",
        "data/chunk-000/file-000.parquet",
    ):
        assert pq.read_table(a / rel).equals(pq.read_table(b / rel)), rel
    store_a, store_b = EpisodeStore(a), EpisodeStore(b)
    assert len(store_a.episodes) == len(store_b.episodes)
    for index in range(len(store_a.episodes)):
        ep_a, ep_b = store_a.read_episode(index), store_b.read_episode(index)
        assert ep_a.task == ep_b.task and ep_a.success == ep_b.success
        np.testing.assert_array_equal(ep_a.state, ep_b.state)
        np.testing.assert_array_equal(ep_a.action, ep_b.action)
        for view in ep_a.views:
            for field in ("rgb", "depth", "intrinsics", "extrinsics"):
                np.testing.assert_array_equal(
                    getattr(ep_a.views[view], field), getattr(ep_b.views[view], field)
                )


def test_workers_make_the_same_store(tmp_path):
    ok(["prepare", "synthetic", "--out", str(tmp_path / "one")])
    output = ok(["prepare", "synthetic", "--workers", "2", "--out", str(tmp_path / "two")])
    assert "prepare synthetic episodes: 5/5" in output
    assert_same_store(tmp_path / "one", tmp_path / "two")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no parts folder left


def test_shards_in_parallel_processes_merge_to_the_one_shot_store(tmp_path):
    shards = [tmp_path / f"shard{i}" for i in range(3)]
    procs = [cli("prepare", "synthetic", "--shard", f"{i}/3", "--out", str(s)) for i, s in enumerate(shards)]
    for proc in procs:
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output
    for i, shard in enumerate(shards):  # episodes i, i + 3, ... of the 5
        held = sorted(int(p.name.split("-")[1]) for p in (shard / "episodes").iterdir())
        assert held == shard_episodes(5, i, 3)
    output = ok(["merge", *map(str, reversed(shards)), "--out", str(tmp_path / "merged")])
    assert "episodes" in output
    ok(["prepare", "synthetic", "--out", str(tmp_path / "oneshot")])
    assert_same_store(tmp_path / "merged", tmp_path / "oneshot")


def test_merge_refuses_incomplete_repeated_or_mismatched_shards(tmp_path):
    for i in range(2):
        ok(["prepare", "synthetic", "--shard", f"{i}/2", "--out", str(tmp_path / f"s{i}")])
    ok(["prepare", "synthetic", "--shard", "1/2", "--resize", "16x16", "--out", str(tmp_path / "other")])
    cases = [
        (["s0"], "shard 1/2 is missing"),
        (["s0", "s1", "s1"], "given twice"),
        (["s0", "other"], "prepare.resize"),
        (["nope"], "not a shard folder"),
    ]
    for names, needle in cases:
        result = runner.invoke(
            app, ["merge", *(str(tmp_path / n) for n in names), "--out", str(tmp_path / "m")]
        )
        assert result.exit_code != 0 and needle in result.output, result.output
        assert "Traceback" not in result.output and not (tmp_path / "m").exists()
    result = runner.invoke(app, ["prepare", "synthetic", "--shard", "2/2", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "prepare.shard" in result.output and "0 <= i < N" in result.output


def test_killed_prepare_continues_where_it_stopped(tmp_path):
    out = tmp_path / "store"
    parts = PartsFolder.beside(out) / "episodes"
    proc = cli("prepare", "slow", "--out", str(out), env={"XWAM_TEST_SLEEP": "0.5"})
    deadline = time.time() + 300
    while time.time() < deadline and len(list(parts.glob("episode-*"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    kept = len(list(parts.glob("episode-*")))
    assert 2 <= kept < 6 and not out.exists()
    output = ok(["prepare", "slow", "--out", str(out)])
    assert f"continuing: {kept} of 6 episodes already done" in " ".join(output.split())
    assert not PartsFolder.beside(out).exists()
    ok(["prepare", "slow", "--out", str(tmp_path / "oneshot")])
    assert_same_store(out, tmp_path / "oneshot")


def test_interrupted_prepare_keeps_its_episodes_and_refuses_other_settings(tmp_path, monkeypatch):
    out = tmp_path / "store"
    monkeypatch.setenv("XWAM_TEST_STOP_AT", "3")
    result = runner.invoke(app, ["prepare", "slow", "--out", str(out)])
    assert result.exit_code == 130, result.output
    assert "finished episodes are kept in" in result.output and "same command continues" in result.output
    assert len(list((PartsFolder.beside(out) / "episodes").glob("episode-*"))) == 3
    monkeypatch.delenv("XWAM_TEST_STOP_AT")
    result = runner.invoke(app, ["prepare", "slow", "--resize", "16x16", "--out", str(out)])
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code != 0 and len(lines) == 1, result.output
    assert (
        "prepare.resize = []" in result.output
        and "[16, 16]" in result.output
        and "--overwrite" in result.output
    )
    output = ok(["prepare", "slow", "--resize", "16x16", "--out", str(out), "--overwrite"])
    assert "continuing" not in output and EpisodeStore(out).image_size == (16, 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_prepare_resizes_and_resamples_at_import(tmp_path):
    out = tmp_path / "store"
    result = runner.invoke(app, ["prepare", "synthetic", "--fps", "10", "--out", str(out)])
    assert result.exit_code != 0 and "prepare.action_kinds" in result.output, result.output
    result = runner.invoke(app, ["prepare", "synthetic", "--fps", "15", "--out", str(out)])
    assert result.exit_code != 0 and "20 fps" in result.output and "10," in result.output, result.output
    kinds = "prepare.action_kinds=['delta','delta','absolute','absolute']"
    ok(["prepare", "synthetic", "--fps", "10", "--resize", "16x24", "--set", kinds, "--out", str(out)])
    store = EpisodeStore(out)
    assert store.image_size == (16, 24) and store.fps == 10
    info = json.loads((out / "meta" / "info.json").read_text())
    assert info["xwam"]["source_extra"]["import"] == {
        "resized_from": [32, 32],
        "fps_from": 20.0,
        "frame_step": 2,
        "action_kinds": ["delta", "delta", "absolute", "absolute"],
    }
    original = next(SyntheticSource(episodes=1, length=12, size=(32, 32)).episodes())
    stored = store.read_episode(0)
    assert stored.length == 6
    np.testing.assert_array_equal(stored.state, original.state[::2])
    np.testing.assert_allclose(
        stored.action[:, :2], original.action[0::2, :2] + original.action[1::2, :2], atol=1e-6
    )
    np.testing.assert_array_equal(stored.action[:, 2:], original.action[1::2, 2:])


def test_conform_actions_cameras_and_ragged_end():
    rng = np.random.default_rng(0)
    episode = synthetic_episode(rng, 7, (32, 40), ["front"], "reach")
    info = SyntheticSource(size=(32, 40)).info()
    conform = make_conform(info, [16, 20], 20.0 / 3, ["delta", "absolute", "delta", "absolute"])
    out = conform_episode(episode, conform)
    assert out.length == 3 and out.fps == pytest.approx(20 / 3) and out.image_size == (16, 20)
    a = episode.action
    np.testing.assert_allclose(out.action[2, 0], a[6, 0])  # the last kept frame composes what is left
    np.testing.assert_allclose(out.action[1, 0], a[3:6, 0].sum(), rtol=1e-6)
    assert out.action[1, 1] == a[5, 1] and out.action[2, 1] == a[6, 1]
    k, k2 = episode.views["front"].intrinsics[0], out.views["front"].intrinsics[0]
    # pixel centres at integer coordinates: pixel (u, v) covers [u - 0.5, u + 0.5) before and after
    for u in (0.0, 13.0, 39.0):
        ray = np.linalg.solve(k, [u, 5.0, 1.0])
        projected = k2 @ ray
        assert projected[0] / projected[2] == pytest.approx((u + 0.5) * 0.5 - 0.5)
    depth = out.views["front"].depth
    assert set(np.unique(depth)) <= set(np.unique(episode.views["front"].depth))  # nearest: no new depths


@pytest.mark.sim
def test_metaworld_workers_make_the_same_store(tmp_path):
    """Meta-World seeds every episode from (seed, task, episode index): 2 workers record the same episodes."""
    pytest.importorskip("metaworld")
    args = ["prepare", "metaworld", "--tasks", "reach-v3,push-v3", "--episodes", "2", "--views", "corner2"]
    args += ["--size", "64", "--max-steps", "12"]
    ok([*args, "--out", str(tmp_path / "one")])
    ok([*args, "--workers", "2", "--out", str(tmp_path / "two")])
    assert_same_store(tmp_path / "one", tmp_path / "two")
