"""`xwam prepare` end to end through the CLI: summary, one-line errors, nothing written on failure."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tests.conftest import SyntheticSource, read_episode
from xwam_cli.main import app
from xwam_core.data import sources
from xwam_core.data.reader import EpisodeStore

runner = CliRunner()
# the exact form the issue asks for (without --out)
ISSUE_COMMAND = [
    "prepare",
    "metaworld",
    "--tasks",
    "reach-v3,push-v3",
    "--episodes",
    "4",
    "--views",
    "corner2,topview",
    "--size",
    "64",
    "--seed",
    "0",
]


@pytest.fixture
def synthetic_source(monkeypatch):
    """Register a fast synthetic source under the name 'synthetic' (the CLI path is the same)."""
    monkeypatch.setitem(sources.SOURCES, "synthetic", lambda cfg: SyntheticSource(episodes=2))


def assert_one_line_error(result, *needles):
    assert result.exit_code != 0, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith("error:")]
    assert len(error_lines) == 1, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in result.output.replace("\n", " "), result.output


def test_help_lists_only_implemented_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "prepare" in result.output


def test_prepare_synthetic_writes_store_and_summary(tmp_path, synthetic_source):
    out = tmp_path / "store"
    result = runner.invoke(app, ["prepare", "synthetic", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for word in (
        "episodes",
        "frames",
        "expert success rate",
        "views",
        "image size",
        "bytes on disk",
        "seconds",
    ):
        assert word in result.output
    # not a terminal: the bar is a plain line when its task completes, with the last episode's status
    assert "prepare synthetic episodes: 2/2 push (" in result.output
    store = EpisodeStore(out)
    assert len(store.episodes) == 2
    assert "[prepare]" in (out / "meta" / "recipe.toml").read_text()


def test_video_options(tmp_path, synthetic_source):
    out = tmp_path / "store"
    result = runner.invoke(
        app, ["prepare", "synthetic", "--out", str(out), "--video", "h264-444", "--crf", "20"]
    )
    assert result.exit_code == 0, result.output
    info = json.loads((out / "meta" / "info.json").read_text())
    assert info["xwam"]["video_crf"] == 20
    assert info["features"]["observation.images.front"]["info"]["video.pix_fmt"] == "yuv444p"
    bad = runner.invoke(app, ["prepare", "synthetic", "--out", str(tmp_path / "b"), "--video", "vp9"])
    assert_one_line_error(bad, "prepare.video", "'av1', 'h264-444'")
    bad = runner.invoke(app, ["prepare", "synthetic", "--out", str(tmp_path / "b"), "--crf", "-1"])
    assert_one_line_error(bad, "prepare.video_crf", "1..63")
    assert not (tmp_path / "b").exists()


def test_existing_output_needs_overwrite(tmp_path, synthetic_source):
    out = tmp_path / "store"
    assert runner.invoke(app, ["prepare", "synthetic", "--out", str(out)]).exit_code == 0
    info_before = (out / "meta" / "info.json").read_text()
    result = runner.invoke(app, ["prepare", "synthetic", "--out", str(out)])
    assert_one_line_error(result, "already exists", "--overwrite")
    assert (out / "meta" / "info.json").read_text() == info_before
    assert runner.invoke(app, ["prepare", "synthetic", "--out", str(out), "--overwrite"]).exit_code == 0


def test_recipe_errors_are_one_line(tmp_path):
    bad_key = tmp_path / "bad_key.toml"
    bad_key.write_text("[prepare.metaworld]\nsizee = 64\n")
    result = runner.invoke(
        app, ["prepare", "metaworld", "--recipe", str(bad_key), "--out", str(tmp_path / "o")]
    )
    assert_one_line_error(result, "bad_key.toml", "prepare.metaworld.sizee")
    bad_type = tmp_path / "bad_type.toml"
    bad_type.write_text("[prepare.metaworld]\nepisodes = 'four'\n")
    result = runner.invoke(
        app, ["prepare", "metaworld", "--recipe", str(bad_type), "--out", str(tmp_path / "o")]
    )
    assert_one_line_error(result, "prepare.metaworld.episodes", "integer")
    result = runner.invoke(
        app, ["prepare", "synthetic", "--set", "prepare.nope=1", "--out", str(tmp_path / "o")]
    )
    assert_one_line_error(result, "prepare.nope")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad_key.toml", "bad_type.toml"]


def test_unknown_source_and_missing_out(tmp_path):
    assert_one_line_error(
        runner.invoke(app, ["prepare", "carla", "--out", str(tmp_path / "o")]), "unknown source 'carla'"
    )
    assert_one_line_error(runner.invoke(app, ["prepare", "metaworld"]), "--out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "option",
    [["--tasks", "reach-v3"], ["--episodes", "3"], ["--size", "64"], ["--seed", "1"], ["--state", "task"]],
)
def test_metaworld_options_are_refused_for_lerobot(tmp_path, option):
    """An option the chosen source does not have is refused, never silently ignored."""
    result = runner.invoke(
        app, ["prepare", "lerobot", str(tmp_path / "ds"), "--out", str(tmp_path / "o"), *option]
    )
    assert_one_line_error(result, option[0], "metaworld source")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--tasks", "fly-v3"], "fly-v3"),
        (["--views", "corner2,ceiling"], "ceiling"),
        (["--size", "32"], "32"),
        (["--size", "300"], "300"),
        (["--episodes", "0"], "episodes"),
        (["--state", "joint"], "prepare.metaworld.state"),
    ],
)
def test_metaworld_bad_options(tmp_path, args, needle):
    pytest.importorskip("metaworld")
    out = tmp_path / "o"
    result = runner.invoke(app, ["prepare", "metaworld", "--out", str(out), *args])
    assert_one_line_error(result, needle)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_lerobot_bad_source_folder(tmp_path, damage):
    src = tmp_path / "ds"
    if damage == "corrupt":
        (src / "meta").mkdir(parents=True)
        (src / "meta" / "info.json").write_text("{ nope")
    result = runner.invoke(app, ["prepare", "lerobot", str(src), "--out", str(tmp_path / "o")])
    assert_one_line_error(result, str(src))
    assert not (tmp_path / "o").exists()


@pytest.mark.sim
def test_issue_command_produces_valid_store(tmp_path):
    """The exact form from the issue; the scripted experts succeed on these tasks."""
    pytest.importorskip("metaworld")
    out = tmp_path / "mw"
    result = runner.invoke(app, [*ISSUE_COMMAND, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "expert success rate" in result.output and "100.0%" in result.output
    store = EpisodeStore(out)
    assert len(store.episodes) == 8 and store.views == ["corner2", "topview"]
    assert store.has_depth and store.has_cameras and store.image_size == (64, 64)
    assert sorted(store.tasks) == ["push-v3", "reach-v3"]
    info = json.loads((out / "meta" / "info.json").read_text())
    assert info["xwam"]["source_options"]["seed"] == 0
    ep = read_episode(store, 0)
    ep.validate()
    # reproducible: the same command gives the same data
    out2 = tmp_path / "mw2"
    runner.invoke(app, [*ISSUE_COMMAND, "--out", str(out2)])
    ep2 = read_episode(EpisodeStore(out2), 0)
    assert (ep.views["corner2"].rgb == ep2.views["corner2"].rgb).all() and (ep.action == ep2.action).all()


@pytest.mark.sim
def test_state_task_is_recorded_in_the_store(tmp_path):
    """--state task: 18 named state dimensions, and the choice in info.json's xwam section."""
    pytest.importorskip("metaworld")
    out = tmp_path / "mw"
    args = ["--tasks", "reach-v3", "--episodes", "1", "--views", "topview", "--max-steps", "3"]
    result = runner.invoke(app, ["prepare", "metaworld", *args, "--state", "task", "--out", str(out)])
    assert result.exit_code == 0, result.output
    info = json.loads((out / "meta" / "info.json").read_text())
    assert info["xwam"]["source_extra"]["state"] == "task"
    assert info["xwam"]["source_options"]["state"] == "task"
    from xwam_core.data.sources.metaworld import TASK_STATE_NAMES

    store = EpisodeStore(out)
    assert store.state_names == TASK_STATE_NAMES
    ep = read_episode(store, 0)
    assert ep.state.shape == (3, 18)
    ep.validate()
