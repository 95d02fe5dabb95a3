"""Bad command-line values of evaluate / reconstruct / infer / ablate: one line naming the option and what was
expected, a non-zero exit, refused before the expensive work (the expensive function is replaced by one
that fails the test if called), and nothing of the user's replaced."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SyntheticSource, write_store
from tests.run_fixtures import (
    TINY,
    app,
    no_temporaries,
    one_line_error,
    other_store,
    runner,
    scene_run,
    tiny_overrides,
    world_run,
)
from xwam_core.errors import XWAMError
from xwam_core.infer_options import EpisodeRanges, InferOptions, parse_episodes

PRECIOUS = "years of work\n"


def never(name: str) -> Any:
    """A stand-in for an expensive function: calling it fails the test (the check came too late)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"{name} was called: the bad input was not refused before it")

    return call


@pytest.fixture
def run_copy(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Path:
    """A private copy of the tiny world-mode run (its store stays where the manifest says)."""
    dest = tmp_path / "run"
    shutil.copytree(world_run(tmp_path_factory), dest)
    (dest / "metrics.json").unlink(missing_ok=True)
    return dest


def evaluate(*args: str) -> Any:
    return runner.invoke(app(), ["evaluate", *args])


# ------------------------------------------------------------------------------------ 3: evaluate --out
def test_evaluate_out_refuses_an_existing_file_without_overwrite(run_copy, tmp_path, monkeypatch):
    from xwam_core import evaluate as core

    precious = tmp_path / "notes.txt"
    precious.write_text(PRECIOUS)
    with monkeypatch.context() as m:
        m.setattr(core, "evaluate_run", never("evaluate_run"))
        result = evaluate(str(run_copy), "--metrics", "action_mse", "--out", str(precious))
        one_line_error(result, f"--out {precious}: already exists; pass --overwrite to replace it")
        # --overwrite replaces only a results JSON of `xwam evaluate`, never another file
        result = evaluate(str(run_copy), "--metrics", "action_mse", "--out", str(precious), "--overwrite")
        one_line_error(result, f"--out {precious}: exists and is not a results JSON of `xwam evaluate`")
        other_json = tmp_path / "config.json"
        other_json.write_text('{"lr": 0.001}')
        result = evaluate(str(run_copy), "--metrics", "action_mse", "--out", str(other_json), "--overwrite")
        one_line_error(result, "is not a results JSON of `xwam evaluate`")
        assert other_json.read_text() == '{"lr": 0.001}'
    assert precious.read_text() == PRECIOUS
    no_temporaries(tmp_path)

    # the default RUN/metrics.json: written once, then refused, then replaced with --overwrite
    assert evaluate(str(run_copy), "--metrics", "action_mse").exit_code == 0
    default = run_copy / "metrics.json"
    before = default.read_text()
    one_line_error(
        evaluate(str(run_copy), "--metrics", "action_l1"), f"--out {default}: already exists", "--overwrite"
    )
    assert default.read_text() == before
    result = evaluate(str(run_copy), "--metrics", "action_l1", "--overwrite")
    assert result.exit_code == 0, result.output
    assert list(json.loads(default.read_text())["metrics"]) == ["action_l1"]
    # a results JSON elsewhere is replaced with --overwrite as well
    elsewhere = tmp_path / "m.json"
    shutil.copy(default, elsewhere)
    result = evaluate(str(run_copy), "--metrics", "action_mse", "--out", str(elsewhere), "--overwrite")
    assert result.exit_code == 0, result.output
    assert list(json.loads(elsewhere.read_text())["metrics"]) == ["action_mse"]


def test_evaluate_sim_out_and_video_are_refused_before_the_checkpoint_loads(tmp_path, monkeypatch):
    from xwam_core.policy import Policy

    monkeypatch.setattr(Policy, "from_checkpoint", never("Policy.from_checkpoint"))
    precious = tmp_path / "notes.txt"
    precious.write_text(PRECIOUS)
    base = ["--sim", "metaworld", "--ckpt", str(tmp_path / "ckpt"), "--tasks", "reach-v3"]
    one_line_error(
        evaluate(*base, "--out", str(precious)), f"--out {precious}: already exists; pass --overwrite"
    )
    one_line_error(
        evaluate(*base, "--out", str(precious), "--overwrite"), "is not a results JSON of `xwam evaluate`"
    )
    assert precious.read_text() == PRECIOUS
    videos = tmp_path / "rollouts"
    videos.mkdir()
    (videos / "reach-v3_ep000_model.mp4").write_text("an earlier run's video")
    one_line_error(
        evaluate(*base, "--video", str(videos)),
        f"--video {videos}: already holds files",
        "pass --overwrite to replace the mp4s of the same names",
    )
    assert (videos / "reach-v3_ep000_model.mp4").read_text() == "an earlier run's video"
    # with --overwrite the checks pass: the next step is loading the checkpoint (refused here on purpose)
    result = evaluate(*base, "--video", str(videos), "--overwrite")
    assert result.exit_code != 0 and "Policy.from_checkpoint was called" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "Policy.from_checkpoint was called" in evaluate(*base, "--video", str(empty)).output


@pytest.mark.sim
def test_evaluate_sim_rerun_needs_overwrite_and_keeps_other_files(tmp_path_factory, tmp_path):
    pytest.importorskip("metaworld")
    from tests.run_fixtures import metaworld_checkpoint

    ckpt = metaworld_checkpoint(tmp_path_factory)
    out, videos = tmp_path / "sim.json", tmp_path / "rollouts"
    args = ["--sim", "metaworld", "--ckpt", str(ckpt), "--tasks", "reach-v3", "--episodes", "1"]
    args += ["--max-steps", "2", "--baselines", "none", "--out", str(out), "--video", str(videos)]
    first = evaluate(*args)
    assert first.exit_code == 0, first.output
    (videos / "notes.txt").write_text(PRECIOUS)
    before = out.read_text()
    one_line_error(evaluate(*args), f"--out {out}: already exists; pass --overwrite")
    assert out.read_text() == before
    again = evaluate(*args, "--overwrite")
    assert again.exit_code == 0, again.output
    assert json.loads(out.read_text())["tasks"] == ["reach-v3"]
    assert sorted(p.name for p in videos.iterdir()) == ["notes.txt", "reach-v3_ep000_model.mp4"]
    assert (videos / "notes.txt").read_text() == PRECIOUS


# ------------------------------------------------------------------------------------ 10: duplicate tasks
def test_evaluate_sim_refuses_a_task_given_twice(tmp_path, monkeypatch):
    from xwam_core.policy import Policy

    monkeypatch.setattr(Policy, "from_checkpoint", never("Policy.from_checkpoint"))
    out = tmp_path / "dup.json"
    for tasks, twice in (("reach-v3,reach-v3", "reach-v3"), ("push-v3,reach-v3, push-v3", "push-v3")):
        result = evaluate("--sim", "metaworld", "--ckpt", str(tmp_path), "--tasks", tasks, "--out", str(out))
        one_line_error(result, f"--tasks {tasks}: {twice} is given twice; expected each task once")
    assert not out.exists()


# ------------------------------------------------------------------------------------ 5: voxel / depth
@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--voxel-size", "nan", "--voxel-size nan: expected a finite length > 0 in metres, at least 1e-06"),
        ("--voxel-size", "inf", "--voxel-size inf: expected a finite length > 0 in metres"),
        (
            "--voxel-size",
            "1e-12",
            "--voxel-size 1e-12: expected a finite length > 0 in metres, at least 1e-06",
        ),
        ("--voxel-size", "-1", "--voxel-size -1.0: expected a finite length > 0"),
        ("--max-depth", "nan", "--max-depth nan: expected a finite depth > 0 in metres"),
        ("--max-depth", "inf", "--max-depth inf: expected a finite depth > 0 in metres"),
        ("--max-depth", "-inf", "--max-depth -inf: expected a finite depth > 0 in metres"),
    ],
)
def test_voxel_size_and_max_depth_are_finite_and_checked_before_work(
    run_copy, monkeypatch, option, value, expected
):
    from xwam_core import evaluate as core_evaluate
    from xwam_core import reconstruct as core_reconstruct
    from xwam_core import runs

    with monkeypatch.context() as m:
        m.setattr(core_reconstruct, "_reconstruct_window", never("_reconstruct_window"))
        result = runner.invoke(app(), ["reconstruct", str(run_copy), option, value])
    one_line_error(result, expected)
    assert "bug in xwam" not in result.output and "Open3D Error" not in result.output
    assert not (run_copy / "points").exists()
    with monkeypatch.context() as m:  # evaluate: before the run is even read
        m.setattr(runs, "load_run", never("load_run"))
        m.setattr(core_evaluate, "evaluate_run", never("evaluate_run"))
        result = evaluate(str(run_copy), "--metrics", "chamfer", option, value)
    one_line_error(result, expected)
    assert "\x1b" not in result.output and not (run_copy / "metrics.json").exists()


def test_voxel_checks_in_the_library_and_open3d_limit_named(tmp_path, monkeypatch):
    from xwam_core import reconstruct as core_reconstruct
    from xwam_core.evaluate import evaluate_run
    from xwam_core.metrics import METRICS
    from xwam_core.runs import load_run

    run = load_run(scene_run(tmp_path / "scene"))
    with pytest.raises(XWAMError, match=r"--voxel-size nan: expected a finite length > 0"):
        evaluate_run(run, [METRICS["chamfer"]], voxel_size=float("nan"))
    with pytest.raises(XWAMError, match=r"--max-depth inf: expected a finite depth > 0"):
        evaluate_run(run, [METRICS["chamfer"]], max_depth=float("inf"))
    # the smallest voxel allowed works (Open3D grids the scene) and equals no downsampling at all
    fine = evaluate_run(run, [METRICS["chamfer"]], voxel_size=core_reconstruct.MIN_VOXEL_SIZE)
    plain = evaluate_run(run, [METRICS["chamfer"]])
    assert fine["metrics"]["chamfer"]["model"]["overall"] == pytest.approx(
        plain["metrics"]["chamfer"]["model"]["overall"], abs=1e-9
    )

    # a cloud over 2 km across at the smallest voxel: Open3D's error becomes a line naming --voxel-size
    def too_small(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("\x1b[1;31m[Open3D Error] (VoxelDownSample) voxel_size is too small.\x1b[0;m")

    monkeypatch.setattr(core_reconstruct, "fuse_views", too_small)
    with pytest.raises(XWAMError) as caught:
        core_reconstruct.step_cloud(run, 0, 1, "pred", voxel_size=1e-6)
    assert str(caught.value).startswith("--voxel-size 1e-06: too small for the cloud of window 0, step 1")
    assert "\x1b" not in str(caught.value)


# ------------------------------------------------------------------------------------ 15: lpips weights
def test_lpips_weights_folder_is_named_a_folder(run_copy, tmp_path, monkeypatch):
    from xwam_core import evaluate as core_evaluate
    from xwam_core.metrics import LPIPS_WEIGHTS_ENV

    monkeypatch.setattr(core_evaluate, "evaluate_run", never("evaluate_run"))
    folder = tmp_path / "weights"
    folder.mkdir()
    result = evaluate(str(run_copy), "--metrics", "psnr,lpips", "--lpips-weights", str(folder))
    one_line_error(
        result, f"--lpips-weights {folder}: is a folder; expected the weights file", "safetensors or .pth"
    )
    assert "do not exist" not in result.output
    monkeypatch.setenv(LPIPS_WEIGHTS_ENV, str(folder))
    result = evaluate(str(run_copy), "--metrics", "psnr,lpips")
    one_line_error(result, f"${LPIPS_WEIGHTS_ENV} {folder}: is a folder; expected the weights file")
    # a missing file still says so
    one_line_error(
        evaluate(str(run_copy), "--metrics", "lpips", "--lpips-weights", str(tmp_path / "alex.pth")),
        "do not exist",
    )
    assert not (run_copy / "metrics.json").exists()


# ------------------------------------------------------------------------------------ 6, 7: infer
@pytest.fixture
def one_episode_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return other_store(tmp_path_factory, "hardening")  # 1 episode; no checkpoint is needed to refuse


def infer(store: Path, tmp_path: Path, *args: str) -> Any:
    # the checkpoint does not exist: every refusal here comes before it is even looked for
    base = ["infer", "--ckpt", str(tmp_path / "ckpt"), "--data", str(store), "--out", str(tmp_path / "o")]
    return runner.invoke(app(), [*base, "--mode", "policy", *args])


def test_infer_episode_ranges_are_checked_without_being_built(one_episode_store, tmp_path, monkeypatch):
    from xwam_core.policy import Policy

    monkeypatch.setattr(Policy, "from_checkpoint", never("Policy.from_checkpoint"))
    # 10**18 episodes as a list would exhaust memory long before the line is printed
    result = infer(one_episode_store, tmp_path, "--episodes", "0-1000000000000000000")
    one_line_error(
        result,
        f"--episodes: {one_episode_store} has no episode(s) [1-1000000000000000000] (the store has 1: 0)",
    )
    assert len(result.output) < 400, result.output
    result = infer(one_episode_store, tmp_path, "--episodes", "-1,0,3,5-9,2,20,30,40,50,60")
    one_line_error(result, "has no episode(s) [-1, 2-3, 5-9, 20, 30, ... (3 more)] (the store has 1: 0)")
    one_line_error(infer(one_episode_store, tmp_path, "--episodes", ","), "--episodes ','", "like 3,4")
    assert not (tmp_path / "o").exists()


def test_episode_ranges_parse_compare_and_show():
    ranges = parse_episodes("0-2,7,2")
    assert isinstance(ranges, EpisodeRanges) and ranges == [0, 1, 2, 7] and list(ranges) == [0, 1, 2, 7]
    assert ranges != [0, 1, 2] and ranges != [0, 1, 2, 7, 8] and str(ranges) == "0-2,7,2"
    assert parse_episodes(None) is None and parse_episodes(" ") is None
    huge = parse_episodes("5,0-1000000000000")
    assert huge is not None and huge != [5, 0, 1]  # compared lazily, never expanded
    assert huge.missing(6) == [(6, 1000000000000)]
    assert parse_episodes("5,0-4,3").resolve(6, "s") == [5, 0, 1, 2, 3, 4]  # type: ignore[union-attr]
    with pytest.raises(
        XWAMError, match=r"^--episodes: s has no episode\(s\) \[6-1000000000000\] \(the store has 6: 0-5\)$"
    ):
        huge.resolve(6, "s")
    with pytest.raises(XWAMError, match=r"--episodes '5-2'"):
        parse_episodes("5-2")
    long_text = "1," * 100 + "x"
    with pytest.raises(XWAMError) as caught:
        parse_episodes(long_text)
    assert len(str(caught.value)) < 150  # the text is cut, not repeated whole
    # the recorded command line keeps the ranges as written
    opts = InferOptions(Path("c"), Path("s"), Path("o"), episodes=parse_episodes("0-3,9"))
    assert "--episodes 0-3,9" in opts.command_line()


@pytest.mark.parametrize("seed", ["99999999999999999999", "18446744073709551616", "-1"])
def test_infer_seed_is_range_checked_before_loading(one_episode_store, tmp_path, monkeypatch, seed):
    from xwam_core.policy import Policy

    monkeypatch.setattr(Policy, "from_checkpoint", never("Policy.from_checkpoint"))
    result = infer(one_episode_store, tmp_path, "--seed", seed)
    one_line_error(result, f"--seed {seed}: expected an integer from 0 to 2**64 - 1")
    assert "unexpected" not in result.output


def test_infer_largest_seed_passes_the_check(one_episode_store, tmp_path):
    # 2**64 - 1 is torch's largest seed: accepted, so the next refusal is the missing checkpoint's
    result = infer(one_episode_store, tmp_path, "--seed", str(2**64 - 1))
    one_line_error(result, "ckpt")
    assert "--seed" not in result.output


# ------------------------------------------------------------------------------------ 4: ablate
@pytest.fixture(scope="module")
def ablate_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hardening-ablate") / "store"
    write_store(path, SyntheticSource(episodes=3, length=14, size=(32, 32), views=("a", "b")))
    return path


def ablate(store: Path, out: Path, *args: str) -> Any:
    sets = [s for s in tiny_overrides(store, out, steps=1) if not s.startswith("train.out")]
    base = ["ablate", str(TINY), "--store", str(store), "--variants", "ans", "--out", str(out)]
    return runner.invoke(app(), [*base, *[a for s in sets for a in ("--set", s)], *args])


@pytest.mark.parametrize("steps", ["0", "501", "-1"])
def test_ablate_max_steps_is_checked_before_any_training(ablate_store, tmp_path, monkeypatch, steps):
    from xwam_core import ablate as core_ablate
    from xwam_core import train

    monkeypatch.setattr(core_ablate, "_train_variant", never("_train_variant"))
    monkeypatch.setattr(train, "train", never("train"))
    out = tmp_path / "abl"
    result = ablate(ablate_store, out, "--max-steps", steps)
    one_line_error(result, f"--max-steps {steps}: expected 1 to 500 (Meta-World's horizon)")
    assert not out.exists()


def test_ablate_never_replaces_a_table_it_did_not_write(ablate_store, tmp_path, monkeypatch):
    from xwam_core import ablate as core_ablate

    monkeypatch.setattr(core_ablate, "_train_variant", never("_train_variant"))
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "ablation.md").write_text(PRECIOUS)
    result = ablate(ablate_store, notes)
    one_line_error(result, f"--out {notes}: ablation.md there was not written by `xwam ablate`")
    assert (notes / "ablation.md").read_text() == PRECIOUS
    assert sorted(p.name for p in notes.iterdir()) == ["ablation.md"]
    (notes / "ablation.json").write_text('{"xwam_ablation": 1}')  # an earlier ablation's table: rewritten
    result = ablate(ablate_store, notes)
    assert "_train_variant was called" in result.output
