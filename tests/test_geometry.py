"""Geometry against exact references: an analytic plane + sphere scene, brute-force Chamfer, projections."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests import geometry_scene as gs
from xwam_core.errors import XWAMError
from xwam_core.geometry import (
    RenderView,
    auto_view,
    chamfer_distance,
    fuse_views,
    look_at,
    one_sided_distances,
    project,
    render_points,
    side_by_side_png,
    tsdf_mesh,
    unproject,
    write_ply,
)


@pytest.fixture(scope="module")
def scene() -> gs.Scene:
    return gs.render()


@pytest.fixture(scope="module")
def fused(scene: gs.Scene) -> tuple[np.ndarray, np.ndarray]:
    points, colors = fuse_views(scene.depths, scene.Ks, scene.poses, scene.rgbs)
    assert colors is not None
    return points, colors


def test_scene_sees_both_surfaces_from_both_cameras(scene: gs.Scene) -> None:
    for K, pose, rgb, depth in zip(scene.Ks, scene.poses, scene.rgbs, scene.depths, strict=True):
        _, surface = gs.ray_cast(K, pose, *depth.shape)
        assert (surface == 1).mean() > 0.3 and (surface == 2).mean() > 0.05 and (surface == 0).any()
        assert (rgb[depth == 0] == 0).all()


def test_fused_views_lie_on_the_true_surface(scene: gs.Scene, fused: tuple[np.ndarray, np.ndarray]) -> None:
    points, colors = fused
    assert len(points) == sum(int((d > 0).sum()) for d in scene.depths) and colors.shape == points.shape
    # Exact analytic distance: only float32 depth storage separates the points from the surface.
    assert gs.distance_to_surface(points).max() < 1e-6
    # Both cameras contribute, and each sees the sphere.
    on_sphere = np.abs(np.linalg.norm(points - gs.SPHERE_CENTRE, axis=1) - gs.SPHERE_RADIUS) < 1e-6
    assert (colors[on_sphere] == (200, 40, 40)).all() and on_sphere.sum() > 1000


def test_fused_views_within_1mm_chamfer_of_dense_true_surface(
    scene: gs.Scene, fused: tuple[np.ndarray, np.ndarray]
) -> None:
    dense = gs.dense_visible_surface(scene, supersample=3)  # exact points, 9 rays per pixel
    assert gs.distance_to_surface(dense).max() < 1e-12
    accuracy = one_sided_distances(fused[0], dense).mean()  # reconstruction error
    completeness = one_sided_distances(dense, fused[0]).mean()  # bounded by the pixel footprint
    assert accuracy < 1e-6
    assert completeness < 2e-3
    assert chamfer_distance(fused[0], dense) < 1e-3


def test_unproject_then_project_is_the_identity(scene: gs.Scene) -> None:
    depth, K, pose = scene.depths[0], scene.Ks[0], scene.poses[0]
    for stride in (1, 3):
        points, _ = unproject(depth, K, pose, stride=stride)
        uv, z = project(points, K, pose)
        v, u = np.nonzero(depth[::stride, ::stride] > 0)
        np.testing.assert_allclose(uv, np.stack([u * stride, v * stride], axis=1), atol=1e-9)
        np.testing.assert_allclose(z, depth[::stride, ::stride][v, u], rtol=1e-12)


def test_pixel_centres_are_integer_coordinates() -> None:
    height, width = 6, 8
    K = gs.intrinsics(height, width, focal=10.0)  # principal point ((W-1)/2, (H-1)/2)
    pose = look_at((0.3, -0.2, 1.0), (0.5, 0.4, 0.1))
    uv, z = project(pose[:3, 3][None] + 2.0 * pose[:3, 2][None], K, pose)  # 2 m along the optical axis
    np.testing.assert_allclose(uv[0], [(width - 1) / 2, (height - 1) / 2], atol=1e-12)
    assert z[0] == pytest.approx(2.0)
    depth = np.zeros((height, width), np.float32)
    depth[0, 0] = 1.0  # the top-left pixel's centre is image coordinate (0, 0)
    points, _ = unproject(depth, K, pose)
    np.testing.assert_allclose(project(points, K, pose)[0], [[0.0, 0.0]], atol=1e-12)


@pytest.mark.parametrize("up", [(0.0, 0.0, 1.0), (0.0, 1.0, 0.0)])
def test_camera_convention_opencv_axes(up: tuple[float, float, float]) -> None:
    height, width = 48, 64
    K = gs.intrinsics(height, width, focal=50.0)
    up_ = np.array(up)
    forward = np.array([1.0, 0.0, 0.0])  # looking along the horizon
    left = np.cross(up_, forward)
    pose = look_at((0.0, 0.0, 0.0), forward, up)
    rotation = pose[:3, :3]
    np.testing.assert_allclose(rotation.T @ rotation, np.eye(3), atol=1e-12)
    assert np.linalg.det(rotation) == pytest.approx(1.0)
    np.testing.assert_allclose(rotation[:, 1], -up_, atol=1e-12)  # camera y (down) is world down
    ahead = 2.0 * forward
    uv, z = project(np.stack([ahead, ahead + 0.3 * up_, ahead + 0.3 * left, -ahead]), K, pose)
    assert z[0] > 0 and 0 <= uv[0, 0] < width and 0 <= uv[0, 1] < height  # in front: inside the image
    assert uv[1, 1] < uv[0, 1] and uv[1, 0] == pytest.approx(uv[0, 0])  # world up -> image up (row 0)
    assert uv[2, 0] < uv[0, 0] and uv[2, 1] == pytest.approx(uv[0, 1])  # world left -> image left
    assert z[3] < 0 and np.isnan(uv[3]).all()  # behind the camera: no pixel


def test_chamfer_matches_brute_force_numpy() -> None:
    rng = np.random.default_rng(0)
    for n_a, n_b in ((300, 500), (1, 40), (257, 3)):
        a, b = rng.normal(size=(n_a, 3)), rng.normal(size=(n_b, 3)) * 0.5 + 0.2
        pairwise = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))  # (n_a, n_b)
        reference = 0.5 * (pairwise.min(axis=1).mean() + pairwise.min(axis=0).mean())
        assert chamfer_distance(a, b) == pytest.approx(reference, rel=1e-12)
        assert chamfer_distance(b, a) == pytest.approx(reference, rel=1e-12)
    assert chamfer_distance(a, a) == 0.0
    shifted = np.array([[0.0, 0.0, 0.0]]), np.array([[0.0, 0.0, 0.003]])
    assert chamfer_distance(*shifted) == pytest.approx(0.003)  # metres, not squared


def test_chamfer_refuses_empty_or_broken_clouds() -> None:
    cloud = np.zeros((4, 3))
    with pytest.raises(XWAMError, match="second point cloud is empty"):
        chamfer_distance(cloud, np.zeros((0, 3)))
    with pytest.raises(XWAMError, match="first point cloud is empty"):
        chamfer_distance(np.zeros((0, 3)), cloud)
    with pytest.raises(XWAMError, match="NaN"):
        chamfer_distance(cloud, np.full((2, 3), np.nan))
    with pytest.raises(XWAMError, match=r"expected \(N, 3\)"):
        chamfer_distance(cloud, np.zeros((4, 2)))


def test_fuse_views_voxel_downsampling_and_bad_input(
    scene: gs.Scene, fused: tuple[np.ndarray, np.ndarray]
) -> None:
    points, colors = fuse_views(scene.depths, scene.Ks, scene.poses, scene.rgbs, voxel_size=0.01)
    assert colors is not None and colors.dtype == np.uint8 and colors.shape == points.shape
    assert 200 < len(points) < len(fused[0]) / 4
    assert chamfer_distance(points, fused[0]) < 0.01
    no_color, none = fuse_views(scene.depths, scene.Ks, scene.poses)
    assert none is None and len(no_color) == len(fused[0])
    with pytest.raises(XWAMError, match="one of each per view"):
        fuse_views(scene.depths, scene.Ks[:1], scene.poses)
    with pytest.raises(XWAMError, match="voxel_size"):
        fuse_views(scene.depths, scene.Ks, scene.poses, voxel_size=0.0)


def test_unproject_skips_invalid_depth() -> None:
    depth = np.array([[0.0, 1.0], [np.nan, 2.0]], np.float32)
    rgb = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    points, colors = unproject(depth, gs.intrinsics(2, 2, 1.0), np.eye(4), rgb)
    assert colors is not None
    np.testing.assert_allclose(points[:, 2], [1.0, 2.0])
    np.testing.assert_array_equal(colors, rgb[[0, 1], [1, 1]])
    with pytest.raises(XWAMError, match="rgb has shape"):
        unproject(depth, gs.intrinsics(2, 2, 1.0), np.eye(4), rgb[:1])


def test_ply_round_trip_is_atomic(tmp_path: Path, fused: tuple[np.ndarray, np.ndarray]) -> None:
    points, colors = fused
    path = write_ply(tmp_path / "clouds" / "step_000.ply", points, colors)
    back, back_colors = gs.read_ply(path)
    np.testing.assert_allclose(back, points, atol=1e-6)
    np.testing.assert_array_equal(back_colors, colors)
    assert sorted(p.name for p in path.parent.iterdir()) == ["step_000.ply"]  # no temporary left over
    bare, none = gs.read_ply(write_ply(tmp_path / "bare.ply", points[:10]))
    assert none is None and bare.shape == (10, 3)


def test_tsdf_mesh_lies_on_the_true_surface(scene: gs.Scene) -> None:
    voxel = 0.01
    mesh = tsdf_mesh(scene.depths, scene.Ks, scene.poses, scene.rgbs, voxel_size=voxel, trunc=3 * voxel)
    vertices = np.asarray(mesh.vertices)
    assert len(vertices) > 500 and len(mesh.triangles) > 500
    distance = gs.distance_to_surface(vertices)
    assert np.median(distance) < voxel / 4 and distance.max() < voxel
    assert mesh.has_vertex_colors()
    # The mesh covers the sphere and the ground, not only one of them.
    on_sphere = np.abs(np.linalg.norm(vertices - gs.SPHERE_CENTRE, axis=1) - gs.SPHERE_RADIUS) < voxel
    assert 0.1 < on_sphere.mean() < 0.9
    plain = tsdf_mesh(scene.depths, scene.Ks, scene.poses, None, voxel_size=voxel, trunc=3 * voxel)
    assert len(plain.vertices) > 500


def test_render_points_z_buffer_and_placement() -> None:
    K = gs.intrinsics(21, 31, focal=20.0)  # the optical axis hits pixel (row 10, column 15)
    view = RenderView(K, look_at((0, 0, 0), (0, 0, 1), up=(0, -1, 0)), height=21, width=31)
    near, far = np.array([[0.0, 0.0, 1.0]]), np.array([[0.0, 0.0, 2.0]])
    colors = np.array([[255, 0, 0], [0, 0, 255]], np.uint8)
    for order in ((0, 1), (1, 0)):  # the nearer point wins whatever the order
        image = render_points(np.concatenate([near, far])[list(order)], colors[list(order)], view)
        assert (image[9:12, 14:17] == (255, 0, 0)).all()  # a 3x3 splat around the axis, red over blue
        assert (image == 255).all(axis=2).sum() == 21 * 31 - 9  # white background elsewhere


def test_preview_pngs(tmp_path: Path, scene: gs.Scene, fused: tuple[np.ndarray, np.ndarray]) -> None:
    from PIL import Image

    points, colors = fused
    image = render_points(points, colors, auto_view(points))  # framed: the cloud fills the picture
    assert image.shape == (360, 480, 3) and (image != 255).any(axis=2).mean() > 0.2
    view = auto_view(points, height=120, width=160)
    pair = side_by_side_png(
        tmp_path / "pair.png", points, colors, points + 0.05, None, view, ("pred", "truth")
    )
    both = np.asarray(Image.open(pair))
    assert both.shape[1] > 2 * 160 and both.shape[0] > 120
    left, right = both[-120:, :160], both[-120:, -160:]
    assert (left != 255).any(axis=2).mean() > 0.2 and (right != 255).any(axis=2).mean() > 0.1
    assert not np.array_equal(left, right)
