"""Damaged stores end with one line naming the file and what was expected, and leave nothing behind;
the frame cache lives outside the store, keyed by the store's identity, built once.

Every damage below is tried two ways: through the library (EpisodeStore + WindowDataset, a DataError
naming the file) and through `xwam infer` (one `error:` line, no traceback, no run folder, no cache).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import SyntheticSource, write_store
from tests.run_fixtures import app, no_temporaries, one_line_error, runner, tiny_checkpoint
from xwam_core.data.frame_cache import cache_folder, is_complete
from xwam_core.data.reader import EpisodeStore
from xwam_core.data.windows import WindowDataset, WindowLayout
from xwam_core.errors import DataError

DATA = "data/chunk-000/file-000.parquet"
VIDEO = "videos/observation.images.b/chunk-000/file-001.mp4"  # episode 1 of view b
EPISODES = "meta/episodes/chunk-000/file-000.parquet"
TASKS = "meta/tasks.parquet"
INFO = "meta/info.json"
STATS = "meta/stats.json"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory)


# ------------------------------------------------------------------------------------ damages
def _json_edit(rel: str, edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def damage(store: Path) -> None:
        data = json.loads((store / rel).read_text())
        result = edit(data)
        (store / rel).write_text(json.dumps(data if result is None else result))

    return damage


def _pop(*keys: str) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        for key in keys[:-1]:
            data = data[key]
        data.pop(keys[-1])

    return edit


def _set(value: object, *keys: str) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        for key in keys[:-1]:
            data = data[key]
        data[keys[-1]] = value

    return edit


def _truncate(rel: str, keep: float = 0.5) -> Callable[[Path], None]:
    def damage(store: Path) -> None:
        data = (store / rel).read_bytes()
        (store / rel).write_bytes(data[: int(len(data) * keep)])

    return damage


def _write(rel: str, content: bytes) -> Callable[[Path], None]:
    return lambda store: (store / rel).write_bytes(content)


def _remove(rel: str) -> Callable[[Path], None]:
    return lambda store: (store / rel).unlink()


def _table_edit(rel: str, edit: Callable[[pa.Table], pa.Table]) -> Callable[[Path], None]:
    def damage(store: Path) -> None:
        pq.write_table(edit(pq.read_table(store / rel)), store / rel)

    return damage


def _bad_png(table: pa.Table) -> pa.Table:
    column = table.column("observation.depth.a").to_pylist()
    column[3] = {"bytes": b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "path": None}
    i = table.schema.get_field_index("observation.depth.a")
    return table.set_column(i, "observation.depth.a", pa.array(column, table.schema.field(i).type))


def _small_png(table: pa.Table) -> pa.Table:
    from xwam_core.data.store import encode_png

    column = table.column("observation.depth.b").to_pylist()
    column[5] = {"bytes": encode_png(np.zeros((16, 32), np.uint16)), "path": None}
    i = table.schema.get_field_index("observation.depth.b")
    return table.set_column(i, "observation.depth.b", pa.array(column, table.schema.field(i).type))


def _shuffled_episodes(table: pa.Table) -> pa.Table:
    """Rows of episode 0 and 1 swapped: readable, consistent counts, but not the store meta/ describes."""
    order = np.r_[14:28, 0:14, 28 : table.num_rows]
    return table.take(pa.array(order))


def _episode_task(store: Path) -> None:
    frame = pd.read_parquet(store / EPISODES)
    frame.at[1, "tasks"] = ["fly"]
    frame.to_parquet(store / EPISODES, index=False)


def _episode_start(store: Path) -> None:
    frame = pd.read_parquet(store / EPISODES)
    frame.at[1, "dataset_from_index"] = 13
    frame.to_parquet(store / EPISODES, index=False)


# (case, damage, needles the one line must hold)
DAMAGES: list[tuple[str, Callable[[Path], None], tuple[str, ...]]] = [
    ("data truncated", _truncate(DATA), (DATA, "Parquet")),
    ("data truncated to its head", _truncate(DATA, 0.02), (DATA, "Parquet")),
    ("data empty", _write(DATA, b""), (DATA, "Parquet")),
    ("data garbage", _write(DATA, b"PAR1 not really" * 50), (DATA, "Parquet")),
    ("data missing", _remove(DATA), (DATA, "missing")),
    (
        "data lacks a column",
        _table_edit(DATA, lambda t: t.drop(["observation.depth.b"])),
        (DATA, "depth.b"),
    ),
    ("data damaged PNG", _table_edit(DATA, _bad_png), (DATA, "frame 3", "PNG")),
    ("data image of another size", _table_edit(DATA, _small_png), (DATA, "frame 5", "expected (32, 32)")),
    ("video missing", _remove(VIDEO), (VIDEO, "missing")),
    ("video truncated", _truncate(VIDEO), (VIDEO, "video")),
    ("video garbage", _write(VIDEO, b"\x00" * 300), (VIDEO, "video")),
    ("data rows missing", _table_edit(DATA, lambda t: t.slice(0, 30)), ("30 frames", "total_frames")),
    ("data rows of another episode", _table_edit(DATA, _shuffled_episodes), ("frame 0", "meta/episodes")),
    (
        "data state of another width",
        _table_edit(
            DATA,
            lambda t: t.set_column(
                t.schema.get_field_index("observation.state"),
                "observation.state",
                pa.array([[0.0] * 3] * t.num_rows, pa.list_(pa.float32())),
            ),
        ),
        ("observation.state", "expected (42, 8)"),
    ),
    ("info missing", _remove(INFO), (INFO, "missing")),
    ("info not JSON", _write(INFO, b"{ not json"), (INFO, "not valid JSON")),
    ("info binary", _write(INFO, b"\xff\xfe\x00garbage"), (INFO, "not valid JSON")),
    ("info a list", _write(INFO, b"[1, 2]"), (INFO, "expected a JSON object")),
    ("info not xwam", _json_edit(INFO, _pop("xwam")), (INFO, "not an xwam store")),
    ("info lacks views", _json_edit(INFO, _pop("xwam", "views")), (INFO, "xwam.views")),
    ("info lacks fps", _json_edit(INFO, _pop("fps")), (INFO, "'fps'")),
    ("info lacks image_size", _json_edit(INFO, _pop("xwam", "image_size")), (INFO, "xwam.image_size")),
    ("info lacks has_depth", _json_edit(INFO, _pop("xwam", "has_depth")), (INFO, "xwam.has_depth")),
    ("info lacks data_path", _json_edit(INFO, _pop("data_path")), (INFO, "data_path")),
    (
        "info lacks action names",
        _json_edit(INFO, _pop("features", "action", "names")),
        (INFO, "action.names"),
    ),
    ("info lacks state feature", _json_edit(INFO, _pop("features", "observation.state")), (INFO, "state")),
    ("info views a string", _json_edit(INFO, _set("a,b", "xwam", "views")), (INFO, "'a,b'", "list")),
    ("info views empty", _json_edit(INFO, _set([], "xwam", "views")), (INFO, "xwam.views")),
    ("info image_size short", _json_edit(INFO, _set([32], "xwam", "image_size")), (INFO, "(height, width)")),
    (
        "info image_size wrong",
        _json_edit(INFO, _set([16, 16], "xwam", "image_size")),
        ("observation.images.a", "frames are 32x32, expected 16x16"),
    ),
    ("info fps text", _json_edit(INFO, _set("fast", "fps")), (INFO, "'fast'", "number > 0")),
    ("info fps zero", _json_edit(INFO, _set(0, "fps")), (INFO, "number > 0")),
    ("info total_frames off", _json_edit(INFO, _set(99, "total_frames")), (EPISODES, "99")),
    ("info total_frames negative", _json_edit(INFO, _set(-1, "total_frames")), (INFO, "integer >= 0")),
    (
        "info data_path without fields",
        _json_edit(INFO, _set("data/x.parquet", "data_path")),
        (INFO, "data_path"),
    ),
    ("info has_depth text", _json_edit(INFO, _set("yes", "xwam", "has_depth")), (INFO, "true or false")),
    ("stats missing", _remove(STATS), (STATS, "missing")),
    ("stats not JSON", _truncate(STATS, 0.3), (STATS, "not valid JSON")),
    ("stats lacks action", _json_edit(STATS, _pop("action")), (STATS, "'action'")),
    ("stats q01 short", _json_edit(STATS, _set([0.0], "action", "q01")), (STATS, "action.q01", "4 finite")),
    (
        "stats q99 NaN",
        _json_edit(STATS, _set([float("nan")] * 8, "observation.state", "q99")),
        (STATS, "q99"),
    ),
    ("stats mean text", _json_edit(STATS, _set("x", "action", "mean")), (STATS, "action.mean")),
    ("tasks missing", _remove(TASKS), (TASKS, "missing")),
    ("tasks truncated", _truncate(TASKS), (TASKS, "Parquet")),
    ("tasks lack task_index", _table_edit(TASKS, lambda t: t.drop(["task_index"])), (TASKS, "task_index")),
    ("episodes missing", _remove(EPISODES), (EPISODES, "missing")),
    ("episodes truncated", _truncate(EPISODES), (EPISODES, "Parquet")),
    ("episodes garbage", _write(EPISODES, b"\x00" * 100), (EPISODES, "Parquet")),
    ("episodes lack length", _table_edit(EPISODES, lambda t: t.drop(["length"])), (EPISODES, "length")),
    ("episodes empty", _table_edit(EPISODES, lambda t: t.slice(0, 0)), (EPISODES, "0 episodes")),
    ("episodes unknown task", _episode_task, (EPISODES, "'fly'")),
    ("episodes overlap", _episode_start, (EPISODES, "row 1", "back to back")),
    (
        "episodes other file",
        _table_edit(
            EPISODES,
            lambda t: t.set_column(
                t.schema.get_field_index("data/file_index"), "data/file_index", pa.array([0, 0, 7])
            ),
        ),
        ("file-007.parquet", "missing"),
    ),
]
# where `xwam infer` refuses the damage earlier, with another line
INFER_NEEDLES = {"info image_size wrong": ("incompatible checkpoint", "16x16")}


@pytest.fixture(scope="module")
def good_store(tmp_path_factory) -> Path:
    """3 episodes of 14 frames, views a/b at 32x32 (the tiny checkpoint's shapes), tasks reach/push."""
    path = tmp_path_factory.mktemp("good") / "store"
    write_store(path, SyntheticSource(episodes=3, length=14, size=(32, 32), views=("a", "b")))
    return path


def _damaged(good: Path, tmp_path: Path, damage: Callable[[Path], None]) -> Path:
    store = tmp_path / "store"
    shutil.copytree(good, store)
    damage(store)
    return store


def _nothing_left(tmp_path: Path, cache_root: Path, store: Path) -> None:
    assert not cache_root.exists() or not any(cache_root.rglob("*")), list(cache_root.rglob("*"))
    no_temporaries(tmp_path)
    assert not (store / "cache").exists()
    for folder in [store, *[p for p in store.rglob("*") if p.is_dir()]]:
        no_temporaries(folder)


@pytest.mark.parametrize(("case", "damage", "needles"), DAMAGES, ids=[d[0] for d in DAMAGES])
def test_damaged_store_is_one_data_error(good_store, tmp_path, monkeypatch, case, damage, needles):
    cache_root = tmp_path / "cache"
    monkeypatch.setenv("XWAM_CACHE", str(cache_root))
    store = _damaged(good_store, tmp_path, damage)
    with pytest.raises(DataError) as caught:
        WindowDataset(EpisodeStore(store), WindowLayout(4, 2))
    message = str(caught.value)
    assert "\n" not in message and len(message) < 400, message
    for needle in needles:
        assert needle in message, message
    _nothing_left(tmp_path, cache_root, store)


@pytest.mark.parametrize(("case", "damage", "needles"), DAMAGES, ids=[d[0] for d in DAMAGES])
def test_damaged_store_is_one_line_in_infer(ckpt, good_store, tmp_path, monkeypatch, case, damage, needles):
    cache_root = tmp_path / "cache"
    monkeypatch.setenv("XWAM_CACHE", str(cache_root))
    store = _damaged(good_store, tmp_path, damage)
    out = tmp_path / "run"
    args = ["infer", "--ckpt", str(ckpt[1]), "--data", str(store), "--out", str(out), "--episodes", "0"]
    result = runner.invoke(app(), args)
    one_line_error(result, *INFER_NEEDLES.get(case, needles))
    assert not out.exists()
    _nothing_left(tmp_path, cache_root, store)


def test_damaged_video_in_a_lerobot_source_is_one_line(tmp_path):
    """The store has no videos; the LeRobot datasets `prepare` imports do: a damaged mp4 is one line."""
    from tests.lerobot_fixtures import make_lerobot_dataset

    make_lerobot_dataset(tmp_path / "ds", n_episodes=2, cameras=("front",), episodes_per_file=1)
    mp4 = tmp_path / "ds" / "videos" / "observation.images.front" / "chunk-000" / "file-001.mp4"
    mp4.write_bytes(mp4.read_bytes()[:300])
    out = tmp_path / "out" / "store"
    result = runner.invoke(app(), ["prepare", "lerobot", str(tmp_path / "ds"), "--out", str(out)])
    one_line_error(result, "file-001.mp4", "video")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------ the cache
def test_cache_is_outside_the_store_and_keyed_by_its_identity(good_store, tmp_path, monkeypatch):
    monkeypatch.delenv("XWAM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    store = tmp_path / "store"
    shutil.copytree(good_store, store)
    folder = cache_folder(EpisodeStore(store))
    assert folder.parent.parent == tmp_path / "xdg" / "xwam" / "frames-v2"
    assert folder.parent.name.startswith("store-")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_folder(EpisodeStore(store)).is_relative_to(tmp_path / "home" / ".cache" / "xwam")
    monkeypatch.setenv("XWAM_CACHE", str(tmp_path / "mine"))
    first = EpisodeStore(store).frame_cache()
    assert first.path.is_relative_to(tmp_path / "mine") and is_complete(first.path)
    # another path -> another cache; the same content at the same path -> the same cache
    copy = tmp_path / "copy"
    shutil.copytree(store, copy)
    assert cache_folder(EpisodeStore(copy)).parent != first.path.parent
    assert cache_folder(EpisodeStore(store)) == first.path
    # the store changes at the same path (prepared again with other episodes): a new cache, the old one goes
    shutil.rmtree(store)
    write_store(store, SyntheticSource(episodes=2, length=14, size=(32, 32), views=("a", "b"), seed=3))
    lines: list[str] = []
    second = EpisodeStore(store).frame_cache(notify=lines.append)
    assert second.path != first.path and second.path.parent == first.path.parent
    assert not first.path.exists() and [p.name for p in second.path.parent.iterdir()] == [second.path.name]
    assert any("earlier version" in line for line in lines), lines
    assert len(second.state) == 28
    # an in-place edit of a data file (same size, new time) is a change too
    data = store / DATA
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 10**9))
    assert cache_folder(EpisodeStore(store)) != second.path


def test_incomplete_cache_is_rebuilt(good_store, tmp_path, monkeypatch):
    monkeypatch.setenv("XWAM_CACHE", str(tmp_path / "cache"))
    store = EpisodeStore(good_store)
    cache = store.frame_cache()
    expected = np.load(cache.path / "state.npy")
    (cache.path / "rgb.a.npy").unlink()  # a user deleting part of it by hand
    assert not is_complete(cache.path)
    rebuilt = store.frame_cache()
    assert is_complete(rebuilt.path)
    np.testing.assert_array_equal(rebuilt.state, expected)


def test_old_cache_inside_the_store_is_ignored_with_a_line(good_store, tmp_path, monkeypatch):
    monkeypatch.setenv("XWAM_CACHE", str(tmp_path / "cache"))
    store = tmp_path / "store"
    shutil.copytree(good_store, store)
    legacy = store / "cache" / "frames-v1"
    legacy.mkdir(parents=True)
    (legacy / "state.npy").write_bytes(b"from an older xwam")
    lines: list[str] = []
    cache = EpisodeStore(store).frame_cache(notify=lines.append)
    assert cache.path.is_relative_to(tmp_path / "cache")
    assert lines and "is not read any more" in lines[0] and str(store / "cache") in lines[0]


def test_a_second_builder_waits_for_the_first(good_store, tmp_path, monkeypatch):
    """One process builds while the others wait on the lock, then reuse its cache."""
    import fcntl

    monkeypatch.setenv("XWAM_CACHE", str(tmp_path / "cache"))
    store = EpisodeStore(good_store)
    folder = cache_folder(store)
    folder.parent.mkdir(parents=True)
    fd = os.open(folder.parent, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # "another process" building
    lines: list[str] = []
    waiter = threading.Thread(target=lambda: store.frame_cache(notify=lines.append))
    waiter.start()
    deadline = time.monotonic() + 30
    while not lines and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lines and "waiting for another process" in lines[0], lines
    assert not folder.exists()
    os.close(fd)  # the other builder is done (here: gave up); the waiter builds
    waiter.join(60)
    assert is_complete(folder)


def test_concurrent_processes_share_one_cache(good_store, tmp_path):
    import subprocess
    import sys

    env = {**os.environ, "XWAM_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(Path.cwd())}
    code = (
        "import sys; from xwam_core.data.reader import EpisodeStore; "
        "c = EpisodeStore(sys.argv[1]).frame_cache(); print(c.path, c.state.shape)"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(good_store)], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outputs = {p.communicate(timeout=120)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(outputs) == 1, outputs
    folder = cache_folder(EpisodeStore(good_store), tmp_path / "cache")
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


def test_stale_cache_temporary_of_a_killed_build_is_removed(good_store, tmp_path, monkeypatch):
    monkeypatch.setenv("XWAM_CACHE", str(tmp_path / "cache"))
    store = EpisodeStore(good_store)
    folder = cache_folder(store)
    left = folder.parent / f".{folder.name}.tmp-0badc0de"
    left.mkdir(parents=True)
    (left / "rgb.a.npy").write_bytes(b"\x00" * 1000)
    lines: list[str] = []
    store.frame_cache(notify=lines.append)
    assert not left.exists()
    assert any("removed" in line and left.name in line for line in lines), lines


def test_reading_a_store_writes_nothing_in_it(good_store, tmp_path, monkeypatch):
    from tests.disk_faults import read_only

    monkeypatch.setenv("XWAM_CACHE", str(tmp_path / "cache"))
    with read_only(good_store) as refused:
        dataset = WindowDataset(EpisodeStore(good_store), WindowLayout(4, 2))
        dataset[0]
    assert refused == []
