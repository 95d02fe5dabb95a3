"""`xwam reconstruct`: per-step fused clouds equal a by-hand unprojection, a scene of known geometry comes back
exactly, previews and meshes are written, and runs without geometry are refused with one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests import geometry_scene
from tests.conftest import RecordingProgress
from tests.run_fixtures import (
    app,
    no_temporaries,
    one_line_error,
    other_store,
    runner,
    scene_run,
    tiny_checkpoint,
    world_run,
)
from xwam_core.geometry import chamfer_distance
from xwam_core.reconstruct import reconstruct_run, step_cloud
from xwam_core.runs import load_run


@pytest.fixture(scope="module")
def run_copy(tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("reconstruct") / "run"
    shutil.copytree(world_run(tmp_path_factory), dest)
    return dest


def by_hand(depths, rgbs, Ks, poses, max_depth):
    """Independent unprojection: every pixel (u, v) with 0 < z <= max_depth -> R K^-1 [u, v, 1] z + t."""
    points, colors = [], []
    for depth, rgb, K, pose in zip(depths, rgbs, Ks, poses, strict=True):
        v, u = np.nonzero((depth > 0) & (depth <= max_depth))
        z = depth[v, u].astype(np.float64)
        x = (u - K[0, 2]) / K[0, 0] * z
        y = (v - K[1, 2]) / K[1, 1] * z
        camera = np.stack([x, y, z], axis=1)
        points.append(camera @ np.asarray(pose[:3, :3], np.float64).T + pose[:3, 3])
        colors.append(rgb[v, u])
    return np.concatenate(points), np.concatenate(colors)


def test_clouds_previews_and_index(run_copy):
    result = runner.invoke(app(), ["reconstruct", str(run_copy)])
    assert result.exit_code == 0, result.output
    run = load_run(run_copy)
    index = json.loads((run_copy / "points" / "index.json").read_text())
    assert [w["folder"] for w in index["windows"]] == ["window-000", "window-001"]
    assert [s["step"] for s in index["windows"][0]["steps"]] == [1, 2, 3, 4]  # future steps only
    for w in range(2):
        for t in (1, 4):
            for which, prefix, poses in (("pred", "pred", "pred_extrinsics"), ("true", "true", "extrinsics")):
                points, colors = geometry_scene.read_ply(
                    run_copy / "points" / f"window-{w:03d}" / f"t{t}_{which}.ply"
                )
                want_p, want_c = by_hand(
                    run[f"{prefix}_depth"][w, :, t],
                    run[f"{prefix}_rgb"][w, :, t],
                    run["intrinsics"][w, :, t],
                    run[poses][w, :, t],
                    run.max_depth,
                )
                np.testing.assert_allclose(points, want_p, atol=1e-6)
                np.testing.assert_array_equal(colors, want_c)
            with Image.open(run_copy / "points" / f"window-{w:03d}" / f"t{t}.png") as im:
                assert im.size[0] > 2 * 400 and im.size[1] > 300  # prediction beside truth
        with Image.open(run_copy / "points" / f"window-{w:03d}" / "overview.png") as im:
            assert im.size[0] >= 4 * 240
    # without --overwrite an existing points/ stays as it is
    stamp = (run_copy / "points" / "index.json").stat().st_mtime_ns
    one_line_error(runner.invoke(app(), ["reconstruct", str(run_copy)]), "already exists", "--overwrite")
    assert (run_copy / "points" / "index.json").stat().st_mtime_ns == stamp
    no_temporaries(run_copy)


def test_known_geometry_comes_back(tmp_path):
    run_path = scene_run(tmp_path / "scene")
    progress = RecordingProgress()
    summary = reconstruct_run(run_path, tsdf=True, progress=progress)
    assert summary.windows == 1 and summary.steps == 2
    assert progress.tasks["steps"] == {"total": 2, "done": 2, "info": "window 1/1 t+2"}
    points, _ = geometry_scene.read_ply(run_path / "points" / "window-000" / "t2_pred.ply")
    assert len(points) > 4000
    assert geometry_scene.distance_to_surface(points).max() < 1e-5  # float32 depth and poses
    truth, _ = geometry_scene.read_ply(run_path / "points" / "window-000" / "t2_true.ply")
    assert chamfer_distance(points, truth) < 1e-9
    mesh_path = run_path / "points" / "window-000" / "t2_pred_mesh.ply"
    import open3d

    vertices = np.asarray(open3d.io.read_triangle_mesh(str(mesh_path)).vertices)
    assert len(vertices) > 100
    assert np.median(geometry_scene.distance_to_surface(vertices)) < 0.01  # within a fraction of a voxel
    # the repeat-frame baseline's cloud is the observed frame's, whatever the step
    run = load_run(run_path)
    repeat, _ = step_cloud(run, 0, 2, "repeat")
    np.testing.assert_array_equal(repeat, step_cloud(run, 0, 0, "true")[0])


def test_runs_without_geometry_are_refused(tmp_path, tmp_path_factory):
    store, ckpt = tiny_checkpoint(tmp_path_factory)
    one_line_error(runner.invoke(app(), ["reconstruct", str(tmp_path / "none")]), "run folder not found")
    policy = tmp_path / "policy"
    base = ["infer", "--ckpt", str(ckpt), "--episodes", "0", "--windows-per-episode", "1"]
    assert (
        runner.invoke(
            app(), [*base, "--data", str(store), "--out", str(policy), "--mode", "policy"]
        ).exit_code
        == 0
    )
    one_line_error(runner.invoke(app(), ["reconstruct", str(policy)]), "policy-mode run", "--mode world")
    no_cameras = other_store(tmp_path_factory, "no-cameras", cameras=False)
    blind = tmp_path / "blind"
    result = runner.invoke(app(), [*base, "--data", str(no_cameras), "--out", str(blind)])
    assert result.exit_code == 0, result.output
    one_line_error(runner.invoke(app(), ["reconstruct", str(blind)]), "has no cameras")
    one_line_error(runner.invoke(app(), ["reconstruct", str(blind), "--voxel-size", "-1"]), "has no cameras")
    assert not (policy / "points").exists() and not (blind / "points").exists()
    no_temporaries(blind)
