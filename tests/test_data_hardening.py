"""Bad input to the data layer ends in one line naming the file, column, episode or frame and what was
expected; the wrong data is never imported; nothing half-written is left.

LeRobot metadata (duplicate or overlapping episodes, NaN times, malformed cells), damaged parts of a
sharded or resumed prepare, non-finite or singular values in a store, and odd view names.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tests.conftest import SyntheticSource, write_store
from tests.lerobot_fixtures import make_lerobot_dataset
from tests.test_shards import BUILDERS
from xwam_cli.main import app
from xwam_core.data import sources
from xwam_core.data.reader import EpisodeStore
from xwam_core.data.shards import PartsFolder
from xwam_core.data.sources.base import SourceInfo
from xwam_core.data.sources.lerobot import LeRobotSource
from xwam_core.data.video import VideoReader
from xwam_core.data.windows import WindowDataset, WindowLayout
from xwam_core.errors import DataError, XWAMError
from xwam_core.geometry import fuse_views, unproject

runner = CliRunner()
EP_META = "meta/episodes/chunk-000/file-000.parquet"
FRONT = "videos/observation.images.front/chunk-000/file-000.mp4"
V21_EPISODES = "meta/episodes.jsonl"


def one_line(exc: BaseException, *needles: str) -> str:
    message = str(exc)
    assert "\n" not in message and "bug in xwam" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def cli_error(result, *needles: str) -> None:
    assert result.exit_code not in (0, None), result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    flat = " ".join(result.output.split())
    assert "bug in xwam" not in flat, result.output
    for needle in needles:
        assert needle in flat, result.output


# ------------------------------------------------------------------------------------ LeRobot datasets
@pytest.fixture(scope="module")
def v3(tmp_path_factory) -> dict:
    """3 episodes of 6 frames, one camera; episodes 0 and 1 share data file-000 and video file-000."""
    root = tmp_path_factory.mktemp("lr") / "v3"
    return make_lerobot_dataset(
        root, n_episodes=3, length=6, size=(16, 16), cameras=("front",), episodes_per_file=2
    )


@pytest.fixture(scope="module")
def v21(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lr") / "v21"
    return make_lerobot_dataset(
        root, version="v2.1", n_episodes=3, length=6, size=(16, 16), cameras=("front",)
    )


def _copy(truth: dict, tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    shutil.copytree(truth["root"], root)
    return root


def _set_cells(
    rel: str, column: str, values: list, type_: pa.DataType | None = None
) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        table = pq.read_table(root / rel)
        i = table.schema.get_field_index(column)
        array = pa.array(values, type_ or table.schema.field(i).type)
        pq.write_table(table.set_column(i, column, array), root / rel)

    return damage


def _jsonl_edit(rel: str, line: int, edit: dict | None, raw: bytes | None = None) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        if raw is not None:
            (root / rel).write_bytes(raw)
            return
        rows = [json.loads(x) for x in (root / rel).read_text().splitlines()]
        rows[line].update(edit or {})
        (root / rel).write_text("".join(json.dumps(r) + "\n" for r in rows))

    return damage


FROM = "videos/observation.images.front/from_timestamp"
# (case, version, damage, needles): LeRobotSource(root) refuses in one line
METADATA = [
    (
        "v3 duplicate episode_index",
        "v3",
        _set_cells(EP_META, "episode_index", [0, 0, 2]),
        (EP_META, "episode_index 0 appears in row 0 and in row 1", "expected each episode once"),
    ),
    (
        "v3 overlapping episodes",
        "v3",
        _set_cells(EP_META, FROM, [0.0, 0.0, 0.0]),
        (EP_META, "row 1 (episode 1)", "overlapping episode 0", FRONT),
    ),
    (
        "v3 from_timestamp NaN",
        "v3",
        _set_cells(EP_META, FROM, [0.0, float("nan"), 0.0]),
        (EP_META, "row 1 (episode 1)", f"{FROM} is nan", "finite time"),
    ),
    (
        "v3 from_timestamp null",
        "v3",
        _set_cells(EP_META, FROM, [0.0, None, 0.0]),
        (EP_META, "row 1 (episode 1)", f"{FROM} is None", "finite time"),
    ),
    (
        "v3 episode_index null",
        "v3",
        _set_cells(EP_META, "episode_index", [0, None, 2]),
        (EP_META, "row 1", "episode_index is None", "whole number"),
    ),
    (
        "v3 episode_index text",
        "v3",
        _set_cells(EP_META, "episode_index", ["0", "a", "2"], pa.string()),
        (EP_META, "row 0", "episode_index is '0'", "whole number"),
    ),
    (
        "v3 length null",
        "v3",
        _set_cells(EP_META, "length", [6, None, 6]),
        (EP_META, "row 1 (episode 1)", "length is None", "whole number"),
    ),
    (
        "v3 data/file_index null",
        "v3",
        _set_cells(EP_META, "data/file_index", [0, None, 1]),
        (EP_META, "row 1 (episode 1)", "data/file_index is None", "whole number"),
    ),
    (
        "v2.1 duplicate episode_index",
        "v21",
        _jsonl_edit(V21_EPISODES, 1, {"episode_index": 0}),
        (V21_EPISODES, "episode_index 0 appears on lines 1 and 2", "expected each episode once"),
    ),
    (
        "v2.1 episode_index text",
        "v21",
        _jsonl_edit(V21_EPISODES, 1, {"episode_index": "a"}),
        (f"{V21_EPISODES}:2", "episode_index is 'a'", "whole number"),
    ),
    (
        "v2.1 episode_index null",
        "v21",
        _jsonl_edit(V21_EPISODES, 2, {"episode_index": None}),
        (f"{V21_EPISODES}:3", "episode_index is None"),
    ),
    (
        "v2.1 length text",
        "v21",
        _jsonl_edit(V21_EPISODES, 0, {"length": "six"}),
        (f"{V21_EPISODES}:1 (episode 0)", "length is 'six'", "whole number"),
    ),
    (
        "v2.1 episodes not UTF-8",
        "v21",
        _jsonl_edit(V21_EPISODES, 0, None, b'{"episode_index": 0, "x": "\xff\xfe"}\n'),
        (V21_EPISODES, "not UTF-8"),
    ),
    (
        "v2.1 task_index text",
        "v21",
        _jsonl_edit("meta/tasks.jsonl", 0, {"task_index": "x"}),
        ("tasks.jsonl:1", "task_index is 'x'", "whole number"),
    ),
]


@pytest.mark.parametrize(("case", "version", "damage", "needles"), METADATA, ids=[m[0] for m in METADATA])
def test_bad_lerobot_metadata_is_one_line(request, tmp_path, case, version, damage, needles):
    root = _copy(request.getfixturevalue(version), tmp_path)
    damage(root)
    with pytest.raises(DataError) as caught:
        LeRobotSource(root)
    one_line(caught.value, *needles)


def test_duplicate_episode_imports_nothing_through_the_cli(v3, tmp_path):
    root = _copy(v3, tmp_path)
    _set_cells(EP_META, "episode_index", [0, 0, 2])(root)
    result = runner.invoke(app, ["prepare", "lerobot", str(root), "--out", str(tmp_path / "store")])
    cli_error(result, "episode_index 0 appears in row 0 and in row 1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_nan_from_timestamp_of_a_selected_episode_imports_nothing(v3, tmp_path):
    root = _copy(v3, tmp_path)
    _set_cells(EP_META, FROM, [0.0, float("nan"), 0.0])(root)
    result = runner.invoke(
        app,
        [
            "prepare",
            "lerobot",
            str(root),
            "--out",
            str(tmp_path / "store"),
            "--set",
            "prepare.lerobot.episodes=[1]",
        ],
    )
    cli_error(result, "episode 1", "from_timestamp is nan")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


@pytest.mark.parametrize("version", ["v3", "v21"])
def test_nan_timestamp_in_the_data_is_refused(request, tmp_path, version):
    truth = request.getfixturevalue(version)
    root = _copy(truth, tmp_path)
    rel = "data/chunk-000/file-000.parquet" if version == "v3" else "data/chunk-000/episode_000001.parquet"
    table = pq.read_table(root / rel)
    ts = table.column("timestamp").to_numpy().copy()
    row = 6 + 2 if version == "v3" else 2  # episode 1, frame 2
    ts[row] = np.nan
    _set_cells(rel, "timestamp", ts.tolist())(root)
    source = LeRobotSource(root)
    with pytest.raises(DataError) as caught:
        list(source.episodes())
    one_line(caught.value, rel, "episode 1 frame 2", "timestamp is nan", "finite time")


def test_overlap_check_accepts_the_intact_dataset_and_its_episodes(v3):
    source = LeRobotSource(v3["root"])
    episodes = list(source.episodes())
    assert [len(e.state) for e in episodes] == [6, 6, 6]
    for ep, truth in zip(episodes, v3["episodes"], strict=True):
        np.testing.assert_array_equal(ep.state, truth["state"])
        assert np.abs(ep.views["front"].rgb.astype(float) - truth["rgb"]["front"]).mean() < 4


def test_video_reader_refuses_nan_times(v3):
    with VideoReader(Path(v3["root"]) / FRONT, 10) as reader, pytest.raises(DataError) as caught:
        reader.read([0.0, float("nan")])
    one_line(caught.value, "file-000.mp4", "frame time nan", "finite times")


def test_state_stored_as_strings_is_one_line(v3, tmp_path):
    root = _copy(v3, tmp_path)
    rel = "data/chunk-000/file-000.parquet"
    cells = [str(x) for x in pq.read_table(root / rel).column("observation.state").to_pylist()]
    _set_cells(rel, "observation.state", cells, pa.string())(root)
    with pytest.raises(DataError) as caught:
        list(LeRobotSource(root).episodes())
    message = one_line(caught.value, rel, "'observation.state'", "expected numbers")
    assert len(message) < 300 and "[" not in message.split("holds")[-1], message


def test_action_beyond_float32_is_one_line_without_warnings(v3, tmp_path):
    root = _copy(v3, tmp_path)
    rel = "data/chunk-000/file-000.parquet"
    values = np.asarray(pq.read_table(root / rel).column("action").to_pylist(), np.float64)
    values[3, 1] = 1e39
    cells = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), pa.float64()), values.shape[1])
    _set_cells(rel, "action", cells.to_pylist(), cells.type)(root)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(DataError) as caught:
            list(LeRobotSource(root).episodes())
    one_line(caught.value, rel, "episode 0 frame 3", "'action'", "float32's range")


@pytest.mark.parametrize("name", ["a/b", "..", ".", "../x", "a\\b"])
def test_view_names_must_be_plain(v3, name):
    with pytest.raises(DataError) as caught:
        LeRobotSource(v3["root"], views={"observation.images.front": name})
    one_line(caught.value, "observation.images.front", repr(name), "plain view name")


def test_view_name_with_a_slash_is_refused_up_front_by_the_cli(v3, tmp_path):
    out = tmp_path / "store"
    result = runner.invoke(
        app, ["prepare", "lerobot", v3["root"], "--views", "observation.images.front=a/b", "--out", str(out)]
    )
    cli_error(result, "'a/b'", "plain view name")
    assert not out.exists() and not PartsFolder.beside(out).exists()


# ------------------------------------------------------------------------------------ parts and shards
@pytest.fixture(autouse=True)
def test_sources(monkeypatch):
    for name, builder in BUILDERS.items():
        monkeypatch.setitem(sources.SOURCES, name, builder)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """The 2 shards of a prepare of the 5-episode synthetic source, at shards/s0 and shards/s1."""
    root = tmp_path_factory.mktemp("shards")
    with pytest.MonkeyPatch.context() as mp:
        for name, builder in BUILDERS.items():
            mp.setitem(sources.SOURCES, name, builder)
        for i in range(2):
            result = runner.invoke(
                app, ["prepare", "synthetic", "--shard", f"{i}/2", "--out", str(root / f"s{i}")]
            )
            assert result.exit_code == 0, result.output
    return root


PART = "episodes/episode-000002"
MP4 = f"{PART}/observation.images.front.mp4"


def _truncate_file(rel: str, keep: int) -> Callable[[Path], None]:
    return lambda shard: (shard / rel).write_bytes((shard / rel).read_bytes()[:keep])


# (case, damage of shard s0, needles)
PART_DAMAGES = [
    ("mp4 empty", _truncate_file(MP4, 0), (MP4, "empty video", "prepare the shard again")),
    ("mp4 truncated", _truncate_file(MP4, 1000), (MP4, "unreadable video", "prepare the shard again")),
    ("mp4 missing", lambda s: (s / MP4).unlink(), (MP4, "missing", "prepare the shard again")),
    (
        "arrays.npz truncated",
        _truncate_file(f"{PART}/arrays.npz", 100),
        (PART, "BadZipFile", "prepare it again"),
    ),
    (
        "episode.json lacks task",
        lambda s: (s / PART / "episode.json").write_text('{"length": 12}'),
        (f"{PART}/episode.json", "'task' is 'missing'", "prepare it again"),
    ),
    ("prepare.json a list", lambda s: (s / "prepare.json").write_text("[]"), ("prepare.json", "holds list")),
    (
        "prepare.json lacks episodes",
        lambda s: (s / "prepare.json").write_text(
            json.dumps(
                {k: v for k, v in json.loads((s / "prepare.json").read_text()).items() if k != "episodes"}
            )
        ),
        ("prepare.json", "'episodes' is 'missing'"),
    ),
]


@pytest.mark.parametrize(("case", "damage", "needles"), PART_DAMAGES, ids=[d[0] for d in PART_DAMAGES])
def test_merge_refuses_a_damaged_part(shards, tmp_path, case, damage, needles):
    shard = tmp_path / "s0"
    shutil.copytree(shards / "s0", shard)
    damage(shard)
    out = tmp_path / "merged"
    result = runner.invoke(app, ["merge", str(shard), str(shards / "s1"), "--out", str(out)])
    cli_error(result, *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s0"]


def test_merge_of_intact_shards_still_works(shards, tmp_path):
    result = runner.invoke(
        app, ["merge", str(shards / "s0"), str(shards / "s1"), "--out", str(tmp_path / "m")]
    )
    assert result.exit_code == 0, result.output
    assert len(EpisodeStore(tmp_path / "m").episodes) == 5


def test_resumed_prepare_encodes_a_damaged_part_again_and_says_interrupted_once(tmp_path, monkeypatch):
    out = tmp_path / "store"
    monkeypatch.setenv("XWAM_TEST_STOP_AT", "3")
    result = runner.invoke(app, ["prepare", "slow", "--out", str(out)])
    assert result.exit_code == 130, result.output
    assert result.output.count("interrupted") == 1, result.output
    part = PartsFolder.beside(out) / "episodes" / "episode-000001"
    (part / "observation.images.front.mp4").write_bytes(b"")
    monkeypatch.delenv("XWAM_TEST_STOP_AT")
    result = runner.invoke(app, ["prepare", "slow", "--out", str(out)])
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert "empty video" in flat and "encoding it again" in flat and "continuing: 2 of 6" in flat, flat
    ok = runner.invoke(app, ["prepare", "slow", "--out", str(tmp_path / "oneshot")])
    assert ok.exit_code == 0, ok.output
    a, b = EpisodeStore(out).read_episode(1), EpisodeStore(tmp_path / "oneshot").read_episode(1)
    np.testing.assert_array_equal(a.views["front"].rgb, b.views["front"].rgb)


# ------------------------------------------------------------------------------------ stores
class MovingSource(SyntheticSource):
    """SyntheticSource whose views are stored with per-frame cameras (moving_views)."""

    def info(self) -> SourceInfo:
        info = super().info()
        info.moving_views = list(self.views)
        return info


DATA = "data/chunk-000/file-000.parquet"
STORE_EPISODES = "meta/episodes/chunk-000/file-000.parquet"


@pytest.fixture(scope="module")
def moving_store(tmp_path_factory) -> Path:
    """2 episodes of 6 frames (episode 1 starts at frame 6), views a/b with per-frame cameras."""
    path = tmp_path_factory.mktemp("moving") / "store"
    write_store(path, MovingSource(episodes=2, length=6, size=(16, 16), views=("a", "b")))
    return path


@pytest.fixture(scope="module")
def static_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("static") / "store"
    write_store(path, SyntheticSource(episodes=2, length=6, size=(16, 16), views=("a", "b")))
    return path


def _edit_cell(column: str, row: int, edit: Callable[[np.ndarray], np.ndarray], rel: str = DATA):
    def damage(store: Path) -> None:
        table = pq.read_table(store / rel)
        i = table.schema.get_field_index(column)
        cells = table.column(column).to_pylist()
        cells[row] = edit(np.asarray(cells[row], np.float64)).tolist()
        pq.write_table(table.set_column(i, column, pa.array(cells, table.schema.field(i).type)), store / rel)

    return damage


def _state_as_strings(store: Path) -> None:
    table = pq.read_table(store / DATA)
    i = table.schema.get_field_index("observation.state")
    cells = [json.dumps(x) for x in table.column("observation.state").to_pylist()]
    pq.write_table(table.set_column(i, "observation.state", pa.array(cells)), store / DATA)


def _nan(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x.flat[0] = np.nan
    return x


INTR = "observation.cameras.b.intrinsics"
STORE_DAMAGES = [
    (
        "state NaN",
        "moving",
        _edit_cell("observation.state", 8, _nan),
        (DATA, "observation.state", "frame 8 (episode 1)"),
    ),
    (
        "action inf",
        "moving",
        _edit_cell("action", 3, lambda x: x + np.inf),
        (DATA, "action", "NaN/inf", "frame 3 (episode 0)"),
    ),
    (
        "extrinsics NaN",
        "moving",
        _edit_cell("observation.cameras.a.extrinsics", 7, _nan),
        (DATA, "extrinsics", "frame 7 (episode 1)"),
    ),
    (
        "intrinsics zero",
        "moving",
        _edit_cell(INTR, 2, np.zeros_like),
        (DATA, INTR, "singular", "frame 2 (episode 0)"),
    ),
    ("state strings", "moving", _state_as_strings, (DATA, "observation.state", "expected (8,) numbers")),
    (
        "episode intrinsics zero",
        "static",
        _edit_cell("cameras/b/intrinsics", 1, np.zeros_like, STORE_EPISODES),
        (STORE_EPISODES, "episode 1", "view 'b'", "singular"),
    ),
    (
        "from_timestamp NaN",
        "static",
        lambda s: _set_cells(
            STORE_EPISODES, "videos/observation.images.a/from_timestamp", [0.0, float("nan")]
        )(s),
        (STORE_EPISODES, "episode 1", "from_timestamp is nan"),
    ),
]


@pytest.mark.parametrize(
    ("case", "which", "damage", "needles"), STORE_DAMAGES, ids=[d[0] for d in STORE_DAMAGES]
)
def test_damaged_store_values_are_one_data_error(
    moving_store, static_store, tmp_path, monkeypatch, case, which, damage, needles
):
    monkeypatch.setenv("XWAM_CACHE", str(tmp_path / "cache"))
    store = tmp_path / "store"
    shutil.copytree(moving_store if which == "moving" else static_store, store)
    damage(store)
    with pytest.raises(DataError) as caught:
        WindowDataset(EpisodeStore(store), WindowLayout(2, 1))
    assert len(one_line(caught.value, *needles)) < 400


def test_intact_moving_store_reads(moving_store, tmp_path, monkeypatch):
    monkeypatch.setenv("XWAM_CACHE", str(tmp_path / "cache"))
    assert len(WindowDataset(EpisodeStore(moving_store), WindowLayout(2, 1))) > 0


def test_unproject_refuses_singular_intrinsics():
    depth = np.ones((4, 4), np.float32)
    with pytest.raises(XWAMError) as caught:
        unproject(depth, np.zeros((3, 3)), np.eye(4))
    one_line(caught.value, "unproject", "singular", "fx, fy > 0")
    good = np.array([[4.0, 0, 2], [0, 4, 2], [0, 0, 1]])
    with pytest.raises(XWAMError) as caught:
        fuse_views([depth, depth], [good, np.zeros((3, 3))], [np.eye(4), np.eye(4)])
    one_line(caught.value, "view 1", "singular")


def test_a_source_path_relative_or_absolute_is_the_same_setting(tmp_path, monkeypatch):
    """Resuming a prepare (or merging its shards) with the dataset named relative instead of absolute is the
    same prepare: the recorded setting is the absolute path."""
    from xwam_core.data.prepare_config import LeRobotSourceConfig, PrepareConfig
    from xwam_core.data.shards import first_difference, prepare_settings

    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    relative = prepare_settings(PrepareConfig(lerobot=LeRobotSourceConfig(path="data")))
    absolute = prepare_settings(PrepareConfig(lerobot=LeRobotSourceConfig(path=str(tmp_path / "data"))))
    assert first_difference(relative, absolute) is None
    assert relative["prepare.lerobot.path"] == str(tmp_path / "data")
    other = prepare_settings(PrepareConfig(lerobot=LeRobotSourceConfig(path=str(tmp_path / "other"))))
    assert first_difference(relative, other) == "prepare.lerobot.path"


def test_videos_at_another_rate_than_the_dataset_are_refused(tmp_path):
    """info.json's fps drives the frame times read from the videos: a contradicting video.fps is one line."""
    root = tmp_path / "ds"
    make_lerobot_dataset(root, n_episodes=1, cameras=("front",))
    info_path = root / "meta" / "info.json"
    info = json.loads(info_path.read_text())
    info["fps"] = 20
    info_path.write_text(json.dumps(info))
    with pytest.raises(DataError, match=r"video\.fps is 10, but fps is 20"):
        LeRobotSource(str(root))
