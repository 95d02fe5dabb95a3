"""`xwam evaluate RUN`: every number equals the metric functions applied by hand to predictions.npz, the
baselines are computed right, PSNR=inf is capped, and bad input is one line with nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import RecordingProgress
from tests.run_fixtures import app, one_line_error, other_store, runner, scene_run, tiny_checkpoint, world_run
from xwam_core.evaluate import PSNR_CAP_DB, evaluate_run
from xwam_core.geometry import chamfer_distance, fuse_views
from xwam_core.metrics import (
    LPIPS_WEIGHTS_ENV,
    METRICS,
    LPIPSMetric,
    action_l1,
    action_mse,
    depth_abs_rel,
    depth_delta1,
    psnr,
    ssim,
)
from xwam_core.runs import load_run

ALL_BUT_LPIPS = "psnr,ssim,absrel,delta1,chamfer,action_mse,action_l1"


@pytest.fixture(scope="module")
def run_copy(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("evaluate") / "run"
    shutil.copytree(world_run(tmp_path_factory), dest)
    return dest


def evaluate(*args: str):
    return runner.invoke(app(), ["evaluate", *args])


def close(a, b):
    assert a == pytest.approx(b, rel=1e-9, abs=1e-12), (a, b)


def test_numbers_are_the_metric_functions_applied_by_hand(run_copy, tmp_path_factory, monkeypatch):
    monkeypatch.delenv(LPIPS_WEIGHTS_ENV, raising=False)
    result = evaluate(str(run_copy), "--metrics", ALL_BUT_LPIPS)
    assert result.exit_code == 0, result.output
    header = result.output.split("psnr")[0]  # the table's column titles (they wrap in a narrow terminal)
    assert all(word in header for word in ("model", "repeat", "mean", "frame", "zero", "act.", "ahead"))
    report = json.loads((run_copy / "metrics.json").read_text())
    m = report["metrics"]
    assert list(m) == ALL_BUT_LPIPS.split(",")
    with np.load(run_copy / "predictions.npz") as npz:
        a = {k: npz[k] for k in npz.files}
    max_depth = report["max_depth"]
    pred_rgb, true_rgb = a["pred_rgb"][:, :, 1:], a["true_rgb"][:, :, 1:]  # future frames only
    pred_d, true_d = a["pred_depth"][:, :, 1:], a["true_depth"][:, :, 1:]
    per_view = {"psnr": [], "ssim": [], "absrel": [], "delta1": []}
    for v, view in enumerate(["a", "b"]):
        values = np.minimum(psnr(pred_rgb[:, v], true_rgb[:, v], 255.0), PSNR_CAP_DB)
        close(m["psnr"]["model"]["per_view"][view], values.mean())
        per_view["psnr"].append(values)
        # repeat-the-current-frame PSNR with plain numpy
        observed = a["true_rgb"][:, v, :1].astype(np.float64)
        mse = ((observed - true_rgb[:, v].astype(np.float64)) ** 2).mean(axis=(-3, -2, -1))
        close(
            m["psnr"]["baselines"]["repeat_frame"]["per_view"][view], (10 * np.log10(255.0**2 / mse)).mean()
        )
        # the mean frame of the other episodes (infer's mean_rgb), the same way
        mean = a["mean_rgb"][v, 1:].astype(np.float64)
        mse = ((mean[None] - true_rgb[:, v].astype(np.float64)) ** 2).mean(axis=(-3, -2, -1))
        close(m["psnr"]["baselines"]["mean_frame"]["per_view"][view], (10 * np.log10(255.0**2 / mse)).mean())
        values = ssim(pred_rgb[:, v], true_rgb[:, v], 255.0)
        close(m["ssim"]["model"]["per_view"][view], values.mean())
        per_view["ssim"].append(values)
        valid = true_d[:, v] <= max_depth
        for name, fn in (("absrel", depth_abs_rel), ("delta1", depth_delta1)):
            values = fn(pred_d[:, v], true_d[:, v], valid=valid)
            close(m[name]["model"]["per_view"][view], np.nanmean(values))
            per_view[name].append(values)
            repeat = np.repeat(a["true_depth"][:, v, :1], true_d.shape[2], axis=1)
            close(
                m[name]["baselines"]["repeat_frame"]["per_view"][view],
                np.nanmean(fn(repeat, true_d[:, v], valid)),
            )
            mean_d = np.repeat(a["mean_depth"][None, v, 1:], len(true_d), axis=0)
            close(
                m[name]["baselines"]["mean_frame"]["per_view"][view],
                np.nanmean(fn(mean_d, true_d[:, v], valid)),
            )
    for name, values in per_view.items():
        close(m[name]["model"]["overall"], np.nanmean(np.stack(values)))

    # Chamfer between fused clouds (all views, 0 < depth <= max_depth), per window and future step
    def cloud(depth, w, t, poses):
        kept = [np.where((d > 0) & (d <= max_depth), d, 0) for d in depth]
        return fuse_views(kept, list(a["intrinsics"][w, :, t]), list(poses[w, :, t]))[0]

    model, repeat = [], []
    for w in range(len(a["episode_index"])):
        for t in range(1, a["pred_depth"].shape[2]):
            truth = cloud(a["true_depth"][w, :, t], w, t, a["extrinsics"])
            model.append(chamfer_distance(cloud(a["pred_depth"][w, :, t], w, t, a["pred_extrinsics"]), truth))
            repeat.append(chamfer_distance(cloud(a["true_depth"][w, :, 0], w, 0, a["extrinsics"]), truth))
    close(m["chamfer"]["model"]["overall"], np.mean(model))
    close(m["chamfer"]["baselines"]["repeat_frame"]["overall"], np.mean(repeat))
    assert "mean_frame" not in m["chamfer"]["baselines"]  # an averaged depth map is no scene
    assert len(m["chamfer"]["model"]["per_step"]) == 4
    # actions: the model, zeros and the checkpoint's training mean
    _, ckpt = tiny_checkpoint(tmp_path_factory)
    mean = np.asarray(json.loads((ckpt / "normalizer.json").read_text())["stats"]["action"]["mean"])
    true = a["true_actions"].astype(np.float64)
    close(m["action_mse"]["model"]["overall"], action_mse(a["pred_actions"], true))
    close(m["action_l1"]["model"]["overall"], action_l1(a["pred_actions"], true))
    close(m["action_mse"]["baselines"]["zero_action"]["overall"], np.mean(true**2))
    close(m["action_mse"]["baselines"]["mean_action"]["overall"], np.mean((true - mean) ** 2))
    close(m["action_l1"]["baselines"]["mean_action"]["overall"], np.mean(np.abs(true - mean)))
    assert report["store_fingerprint"] and report["episodes"] == [2]


def test_identical_frames_cap_psnr_and_give_zero_error(tmp_path):
    run = load_run(scene_run(tmp_path / "scene"))  # prediction == truth, and the scene never moves
    specs = [METRICS[n] for n in ("psnr", "ssim", "absrel", "delta1", "chamfer", "action_mse")]
    progress = RecordingProgress()
    report = evaluate_run(run, specs, progress=progress)
    assert progress.tasks["metrics"] == {"total": 6, "done": 6, "info": "action_mse"}
    assert progress.tasks["chamfer clouds"]["done"] == progress.tasks["chamfer clouds"]["total"] == 2
    m = report["metrics"]
    assert m["psnr"]["model"]["overall"] == PSNR_CAP_DB
    assert m["psnr"]["baselines"]["repeat_frame"]["overall"] == PSNR_CAP_DB
    assert m["psnr"]["capped"] == {"model": 4, "repeat_frame": 4}  # 1 window x 2 views x 2 future frames
    assert "mean_frame" not in m["psnr"]["baselines"]  # the hand-made run has no other episodes' mean
    assert (
        "mean_frame: " in report["conventions"]["baselines"]
        and "absent" in report["conventions"]["baselines"]
    )
    assert m["ssim"]["model"]["overall"] == pytest.approx(1.0)
    assert m["absrel"]["model"]["overall"] == 0.0 and m["delta1"]["model"]["overall"] == 1.0
    assert (
        m["chamfer"]["model"]["overall"] == 0.0
        and m["chamfer"]["baselines"]["repeat_frame"]["overall"] == 0.0
    )
    json.dumps(report, allow_nan=False)  # no inf/NaN reaches metrics.json


def test_psnr_and_chamfer_need_no_lpips_weights_and_lpips_is_plumbed(run_copy, tmp_path, monkeypatch):
    monkeypatch.delenv(LPIPS_WEIGHTS_ENV, raising=False)
    out = tmp_path / "m.json"
    result = evaluate(str(run_copy), "--metrics", "psnr,chamfer", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert list(json.loads(out.read_text())["metrics"]) == ["psnr", "chamfer"]
    refused = tmp_path / "lpips.json"
    one_line_error(evaluate(str(run_copy), "--metrics", "psnr,lpips", "--out", str(refused)), "LPIPS needs")
    assert not refused.exists()
    # a random AlexNet trunk (plumbing only: such numbers are not LPIPS values)
    torchvision = pytest.importorskip("torchvision")
    from safetensors.torch import save_file

    weights = tmp_path / "alexnet.safetensors"
    trunk = torchvision.models.alexnet(weights=None).state_dict()
    save_file({k: v.contiguous() for k, v in trunk.items() if k.startswith("features.")}, weights)
    result = evaluate(
        str(run_copy), "--metrics", "lpips", "--lpips-weights", str(weights), "--out", str(refused)
    )
    assert result.exit_code == 0, result.output
    lpips = LPIPSMetric(weights)
    a = load_run(run_copy)
    by_hand = lpips(a["pred_rgb"][:, 1, 1:], a["true_rgb"][:, 1, 1:]).mean()
    got = json.loads(refused.read_text())["metrics"]["lpips"]["model"]["per_view"]["b"]
    assert got == pytest.approx(by_hand, rel=1e-6)


def test_bad_input_one_line_nothing_written(run_copy, tmp_path, tmp_path_factory):
    out = tmp_path / "m.json"
    one_line_error(
        evaluate(str(run_copy), "--metrics", "psnr,psnrr", "--out", str(out)), "unknown metric 'psnrr'"
    )
    one_line_error(evaluate(str(tmp_path / "none"), "--out", str(out)), "run folder not found")
    one_line_error(evaluate("--out", str(out)), "give a run folder")
    # a run evaluated against another store, and a run whose store changed after inference
    other = other_store(tmp_path_factory, "no-depth", depth=False)
    one_line_error(evaluate(str(run_copy), "--data", str(other), "--out", str(out)), "fingerprint", "another")
    store, _ = tiny_checkpoint(tmp_path_factory)
    moved_store = tmp_path / "store"
    shutil.copytree(store, moved_store, ignore=shutil.ignore_patterns("cache"))
    moved_run = tmp_path / "run"
    shutil.copytree(run_copy, moved_run, ignore=shutil.ignore_patterns("metrics.json", "points"))
    manifest = json.loads((moved_run / "manifest.json").read_text())
    manifest["store"] = str(moved_store)
    (moved_run / "manifest.json").write_text(json.dumps(manifest))
    assert evaluate(str(moved_run), "--metrics", "action_mse").exit_code == 0  # same content: accepted
    info = moved_store / "meta" / "info.json"
    info.write_text(info.read_text().replace('"fps": 20.0', '"fps": 10.0'))
    (moved_run / "metrics.json").unlink()
    one_line_error(evaluate(str(moved_run), "--metrics", "action_mse"), "fingerprint")
    shutil.rmtree(moved_store)
    one_line_error(evaluate(str(moved_run), "--metrics", "action_mse"), "is not there", "--data")
    assert not out.exists() and not (moved_run / "metrics.json").exists()


def test_store_without_depth_and_policy_runs(tmp_path, tmp_path_factory):
    _, ckpt = tiny_checkpoint(tmp_path_factory)
    no_depth = other_store(tmp_path_factory, "no-depth", depth=False)
    run = tmp_path / "run"
    infer = [
        "infer",
        "--ckpt",
        str(ckpt),
        "--data",
        str(no_depth),
        "--out",
        str(run),
        "--windows-per-episode",
        "1",
    ]
    result = runner.invoke(app(), infer)
    assert result.exit_code == 0, result.output
    assert "all (not the checkpoint's training store)" in result.output.replace("\n", " ")
    for metric in ("absrel", "delta1", "chamfer"):
        one_line_error(evaluate(str(run), "--metrics", f"psnr,{metric}"), metric, "has no depth")
    assert not (run / "metrics.json").exists()
    result = evaluate(str(run))  # default: what this run allows
    assert result.exit_code == 0, result.output
    assert list(json.loads((run / "metrics.json").read_text())["metrics"]) == [
        "psnr",
        "ssim",
        "action_mse",
        "action_l1",
    ]
    policy = tmp_path / "policy"
    assert (
        runner.invoke(
            app(),
            ["infer", "--ckpt", str(ckpt), "--data", str(no_depth), "--out", str(policy), "--mode", "policy"],
        ).exit_code
        == 0
    )
    one_line_error(evaluate(str(policy), "--metrics", "ssim"), "policy-mode run")
    assert not (policy / "metrics.json").exists()
    result = evaluate(str(policy))
    assert result.exit_code == 0, result.output
    assert list(json.loads((policy / "metrics.json").read_text())["metrics"]) == ["action_mse", "action_l1"]


def test_a_run_without_a_training_mean_has_no_mean_action_baseline(tmp_path):
    """A converted release checkpoint carries only q01/q99: its runs have no mean_action array, and
    evaluate reports the zero-action baseline alone (CLI table included)."""
    path = scene_run(tmp_path / "scene")
    arrays = dict(np.load(path / "predictions.npz"))
    del arrays["mean_action"]
    arrays["true_actions"] = np.full_like(arrays["true_actions"], 0.5)
    np.savez(path / "predictions.npz", **arrays)
    from xwam_core.metrics import METRICS

    report = evaluate_run(load_run(path), [METRICS["action_mse"]])
    entry = report["metrics"]["action_mse"]
    assert entry["baselines"] == {"zero_action": {"overall": 0.25}} and entry["model"]["overall"] == 0.25
    from rich.console import Console

    from xwam_cli.evaluate import offline_table

    console = Console(width=200, record=True)
    console.print(offline_table(report))
    text = console.export_text()
    assert "zero act." in text and "mean act." not in text
