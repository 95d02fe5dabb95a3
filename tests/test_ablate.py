"""`xwam ablate`: the variants' recipes, a 2-variant run on a tiny synthetic store, reruns, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SyntheticSource, write_store
from tests.run_fixtures import TINY, app, one_line_error, runner, tiny_overrides
from xwam_core.ablate import VARIANTS, depth_blocks, parse_variants, run_ablation, variant_recipe
from xwam_core.errors import XWAMError
from xwam_core.recipe import load_recipe


def ablate_overrides(store: Path, model: str = "") -> list[str]:
    """The tiny test recipe's overrides without train.out (the ablation sets it per variant)."""
    return [
        s
        for s in tiny_overrides(store, Path("unused"), steps=1, model=model)
        if not s.startswith("train.out")
    ]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ablate") / "store"
    write_store(path, SyntheticSource(episodes=3, length=14, size=(32, 32), views=("a", "b")))
    return path


def test_each_variant_recipe_is_what_its_name_says(tmp_path: Path) -> None:
    base = load_recipe(TINY)  # the tiny recipe: depth_condition on, gated heads
    assert base.model.overrides.get("depth_condition") is True
    recipes = {v: variant_recipe(base, v, tmp_path / v / "run") for v in VARIANTS}
    assert {v: r.noise.mode for v, r in recipes.items()} == {
        "ans": "ans",
        "sync": "sync",
        "decoupled": "decoupled",
        "no-depth": "ans",
    }
    assert {v: r.inference.schedule for v, r in recipes.items()} == {
        "ans": "async",
        "sync": "sync",
        "decoupled": "async",
        "no-depth": "async",
    }
    for v, r in recipes.items():
        assert r.train.out == str(tmp_path / v / "run")
        assert r.inference.num_steps_video == base.inference.num_steps_video
    no_depth = recipes["no-depth"].model.overrides
    # merged with the recipe's overrides: its other entries kept, the depth branch and its RGB-D input off
    assert no_depth == {**base.model.overrides, "num_depth_blocks": 0, "depth_condition": False}
    assert depth_blocks(recipes["no-depth"]) == 0
    assert depth_blocks(recipes["ans"]) > 0
    assert recipes["ans"].model.overrides == base.model.overrides
    assert base.noise.mode == "ans" and base.train.out != recipes["ans"].train.out  # the base is untouched


def test_unknown_variant_is_one_line() -> None:
    with pytest.raises(XWAMError, match="the variants are ans, sync, decoupled, no-depth"):
        parse_variants("ans,nodepth")
    assert parse_variants(None) == list(VARIANTS)
    assert parse_variants("sync, ans") == ["sync", "ans"]
    result = runner.invoke(app(), ["ablate", str(TINY), "--variants", "ans,bogus"])
    one_line_error(result, "unknown variant 'bogus'", "ans, sync, decoupled, no-depth")


def test_bad_recipe_and_contradicting_set_are_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    one_line_error(runner.invoke(app(), ["ablate", str(missing)]), "recipe file not found")
    result = runner.invoke(app(), ["ablate", str(TINY), "--set", "noise.mode=sync"])
    one_line_error(result, "noise.mode is set by the variant")
    mixture = ["--set", f'data.mixture=[{{store = "{tmp_path / "a"}"}}, {{store = "{tmp_path / "b"}"}}]']
    one_line_error(
        runner.invoke(app(), ["ablate", str(TINY), *mixture, "--out", str(tmp_path / "abl")]),
        "data.mixture (2 stores)",
        "pass --store PATH",
    )
    assert not (tmp_path / "abl").exists()


def test_help_lists_ablate() -> None:
    result = runner.invoke(app(), ["--help"])
    assert result.exit_code == 0 and "ablate" in result.output


def test_two_variants_on_a_synthetic_store(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "ablate"
    sets = ablate_overrides(store, model="depth_condition = true")
    result = run_ablation(TINY, ["ans", "no-depth"], sets, out, episodes=2, windows_per_episode=2)
    report = json.loads((out / "ablation.json").read_text())
    assert [v["name"] for v in report["variants"]] == ["ans", "no-depth"]
    ans, no_depth = report["variants"]
    assert ans["num_depth_blocks"] == 1 and no_depth["num_depth_blocks"] == 0
    assert ans["training"] == no_depth["training"] == "trained"
    assert np.isfinite(ans["psnr_db"]) and np.isfinite(no_depth["psnr_db"])
    assert ans["absrel"] is not None and np.isfinite(ans["absrel"])
    assert no_depth["absrel"] is None and no_depth["predicts_depth"] is False
    assert ans["windows"] == no_depth["windows"]  # the same held-out windows for every variant
    assert ans["latency_source"] == "offline" and ans["latency_ms"] > 0
    assert "success_rate" not in ans  # no closed loop: the table says n/a
    assert report["closed_loop"]["ran"] is False
    assert "not a Meta-World store" in report["closed_loop"]["note"]
    assert report["baselines"]["offline"]["repeat_frame"]["psnr"] is not None
    assert report["scale"]["train_steps"] == 1
    # the no-depth run predicted no depth at all
    with np.load(out / "no-depth" / "infer" / "predictions.npz") as npz:
        assert "pred_depth" not in npz.files and "pred_rgb" in npz.files
    # xwam evaluate / reconstruct on the depth-less run: one line each
    bad = runner.invoke(app(), ["evaluate", str(out / "no-depth" / "infer"), "--metrics", "absrel"])
    one_line_error(bad, "predicts no depth")
    one_line_error(
        runner.invoke(app(), ["reconstruct", str(out / "no-depth" / "infer")]), "predicts no depth"
    )
    md = (out / "ablation.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| ans ") or line.startswith("| no-depth ")]
    assert len(rows) == 2
    assert "n/a" in rows[1]  # no-depth's AbsRel (and the skipped closed loop's success)
    assert "67.8%" in rows[0] and "63.0%" in rows[1]  # the paper's numbers beside
    assert "not a Meta-World store" in md and "Scale: 1 training steps" in md
    assert result.row("no-depth").evaluation["absrel"] is None

    # a rerun keeps the finished runs (and their evaluations); --overwrite retrains
    ckpt = next((out / "ans" / "run" / "checkpoints").iterdir())
    mtime = ckpt.stat().st_mtime_ns
    args = ["ablate", str(TINY), "--variants", "ans,no-depth", "--out", str(out), "--episodes", "2"]
    args += ["--windows-per-episode", "2"] + [a for s in sets for a in ("--set", s)]
    again = runner.invoke(app(), args)
    assert again.exit_code == 0, again.output
    assert "finished run" in again.output and "not retrained" in again.output
    flat = again.output.replace("\n", " ")
    assert "no-depth" in flat and "n/a" in flat and "not a Meta-World store" in flat
    report = json.loads((out / "ablation.json").read_text())
    assert [v["training"] for v in report["variants"]] == ["skipped: finished run"] * 2
    assert ckpt.stat().st_mtime_ns == mtime

    third = runner.invoke(app(), [*args[:3], "ans", *args[4:], "--overwrite"])
    assert third.exit_code == 0, third.output
    report = json.loads((out / "ablation.json").read_text())
    assert [v["training"] for v in report["variants"]] == ["trained"]

    # a finished run of another recipe is refused, not silently reused
    changed = runner.invoke(app(), [*args[:3], "ans", *args[4:], "--set", "train.lr=0.5"])
    one_line_error(changed, "holds a run of another recipe", "train.lr", "--overwrite")


def test_closed_loop_columns_on_a_metaworld_shaped_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The closed loop's success, interval, latency and the expert/random baselines reach the table (a
    synthetic store shaped like Meta-World's, taken for one: 1 episode of 3 steps per task)."""
    pytest.importorskip("metaworld")
    import xwam_core.ablate as ablate_module
    from tests.run_fixtures import MW_HAND_STATE

    store = tmp_path / "mw-store"
    source = SyntheticSource(
        episodes=3,
        length=12,
        size=(64, 64),
        views=("corner2", "gripperPOV"),
        tasks=("reach-v3",),
        state_names=MW_HAND_STATE,
    )
    write_store(store, source)
    monkeypatch.setattr(ablate_module, "is_metaworld_store", lambda _store: True)
    out = tmp_path / "ablate"
    result = run_ablation(
        TINY,
        ["sync", "decoupled"],
        [*ablate_overrides(store), "inference.num_steps_video=3", "inference.num_steps_action=1"],
        out,
        episodes=1,
        max_steps=3,
        windows_per_episode=1,
    )
    report = json.loads((out / "ablation.json").read_text())
    assert report["closed_loop"]["ran"] is True and report["closed_loop"]["tasks"] == ["reach-v3"]
    for v in report["variants"]:
        assert v["successes"][1] == 1 and len(v["success_interval_95"]) == 2
        assert v["latency_source"] == "closed loop" and v["latency_ms"] > 0
    sync = result.row("sync")
    assert sync.inference_schedule == "sync" and sync.num_steps_action == sync.num_steps_video
    # the sync schedule takes num_steps_video steps for actions as well: its policy-mode calls say so
    assert sync.evaluation["policy_denoiser_calls"] == sync.num_steps_video
    assert sync.evaluation["policy_denoiser_calls"] == 3
    assert result.row("decoupled").evaluation["policy_denoiser_calls"] == 1  # async: T_action steps
    assert set(report["baselines"]["closed_loop"]) == {"expert", "random"}
    assert not result.row("decoupled").evaluation.get("sim_baselines")  # once, beside the first variant
    md = (out / "ablation.md").read_text()
    assert "| _expert_ |" in md and "Scale: 1 training steps" in md
