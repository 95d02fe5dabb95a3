"""Camera geometry: unprojection, projection, multi-view fusion, Chamfer distance, PLY, TSDF, previews.

Conventions (those of xwam_core.data.episode):
- Depth: (H, W) metres along the optical axis (z), 0 or non-finite = invalid.
- K: 3x3 pinhole intrinsics in pixels. Pixel centres lie at INTEGER image coordinates (OpenCV):
  the pixel in row v, column u covers [u - 0.5, u + 0.5] x [v - 0.5, v + 0.5], so a centred principal
  point is ((W - 1) / 2, (H - 1) / 2), the value the Meta-World source writes.
- cam_to_world: 4x4, OpenCV camera axes (x right, y down, z forward). `project` is the exact inverse of
  `unproject`.
- Points are float64 (N, 3) in the world frame; colours are uint8 (N, 3) RGB.
Numpy in and out; open3d is imported only by the functions that need it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.spatial import cKDTree

from xwam_core.atomic import atomic_file
from xwam_core.errors import XWAMError

if TYPE_CHECKING:
    import open3d


def _intrinsics(K: np.ndarray, where: str) -> np.ndarray:
    K = np.asarray(K, dtype=np.float64)
    if K.shape != (3, 3):
        raise XWAMError(f"{where}: intrinsics have shape {K.shape}, expected (3, 3)")
    return K


def _pose(cam_to_world: np.ndarray, where: str) -> np.ndarray:
    pose = np.asarray(cam_to_world, dtype=np.float64)
    if pose.shape != (4, 4):
        raise XWAMError(f"{where}: camera-to-world pose has shape {pose.shape}, expected (4, 4)")
    return pose


def _points(points: np.ndarray, where: str) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
        raise XWAMError(f"{where}: points have shape {points.shape}, expected (N, 3)")
    return points


Vector = Sequence[float] | np.ndarray


def look_at(eye: Vector, target: Vector, up: Vector = (0.0, 0.0, 1.0)) -> np.ndarray:
    """Camera-to-world (4, 4), OpenCV axes, for a camera at `eye` looking at `target`; `up` is image-up."""
    eye_, target_, up_ = (np.asarray(v, dtype=np.float64) for v in (eye, target, up))
    forward = target_ - eye_
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, up_)
    if np.linalg.norm(right) < 1e-9:
        raise XWAMError(f"look_at: viewing direction {forward.tolist()} is parallel to up {up_.tolist()}")
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    pose = np.eye(4)
    pose[:3, :3] = np.stack([right, down, forward], axis=1)  # columns: camera x, y, z in world
    pose[:3, 3] = eye_
    return pose


def unproject(
    depth: np.ndarray,
    K: np.ndarray,
    cam_to_world: np.ndarray,
    rgb: np.ndarray | None = None,
    stride: int = 1,
    where: str = "unproject",
) -> tuple[np.ndarray, np.ndarray | None]:
    """World points (N, 3) of the valid pixels (depth > 0, finite), row-major; their RGB (N, 3) if given.

    `stride` keeps every stride-th row and column (pixel coordinates stay those of the full image).
    """
    depth = np.asarray(depth)
    if depth.ndim != 2:
        raise XWAMError(f"unproject: depth has shape {depth.shape}, expected (H, W)")
    if stride < 1:
        raise XWAMError(f"unproject: stride must be >= 1, got {stride}")
    K, pose = _intrinsics(K, "unproject"), _pose(cam_to_world, "unproject")
    if rgb is not None and (rgb.shape[:2] != depth.shape or rgb.ndim != 3 or rgb.shape[2] != 3):
        raise XWAMError(f"unproject: rgb has shape {rgb.shape}, expected {(*depth.shape, 3)} like the depth")
    z = depth[::stride, ::stride].astype(np.float64)
    v, u = np.nonzero(np.isfinite(z) & (z > 0))
    z = z[v, u]
    if rgb is not None:
        colors = np.asarray(rgb)[::stride, ::stride][v, u]
    u, v = u * stride, v * stride
    # K^-1 [u, v, 1] has camera-z 1, so scaling it by the depth gives the camera-frame point.
    pixels = np.stack([u, v, np.ones_like(u)], axis=0).astype(np.float64)  # (3, N)
    if not np.isfinite(K).all() or abs(np.linalg.det(K)) < 1e-12:
        raise XWAMError(
            f"{where}: intrinsics {K.tolist()} are singular or not finite; expected fx, fy > 0 "
            "(the store's camera intrinsics of this view)"
        )
    camera = np.linalg.solve(K, pixels) * z  # (3, N)
    points = (pose[:3, :3] @ camera).T + pose[:3, 3]  # (N, 3)
    return points, (colors if rgb is not None else None)


def project(points: np.ndarray, K: np.ndarray, cam_to_world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (N, 2) as (u, v) and camera depth z (N,) of world points; uv is NaN where z <= 0."""
    points = _points(points, "project")
    K, pose = _intrinsics(K, "project"), _pose(cam_to_world, "project")
    camera = (points - pose[:3, 3]) @ pose[:3, :3]  # R^T (p - t), row-wise: (N, 3)
    z = camera[:, 2]
    homogeneous = camera @ K.T  # (N, 3)
    uv = np.full((len(points), 2), np.nan)
    front = z > 0
    uv[front] = homogeneous[front, :2] / homogeneous[front, 2:3]
    return uv, z


def fuse_views(
    depths: Sequence[np.ndarray],
    Ks: Sequence[np.ndarray],
    poses: Sequence[np.ndarray],
    rgbs: Sequence[np.ndarray] | None = None,
    voxel_size: float | None = None,
    stride: int = 1,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One world-frame cloud from several views; optionally voxel-downsampled (open3d, colours averaged)."""
    if not (len(depths) == len(Ks) == len(poses)) or (rgbs is not None and len(rgbs) != len(depths)):
        raise XWAMError(
            f"fuse_views: got {len(depths)} depths, {len(Ks)} intrinsics, {len(poses)} poses"
            f"{'' if rgbs is None else f', {len(rgbs)} images'}; expected one of each per view"
        )
    if not depths:
        raise XWAMError("fuse_views: no views given")
    clouds = [
        unproject(d, k, p, None if rgbs is None else rgbs[i], stride, where=f"fuse_views: view {i}")
        for i, (d, k, p) in enumerate(zip(depths, Ks, poses, strict=True))
    ]
    points = np.concatenate([c[0] for c in clouds])
    colors = None if rgbs is None else np.concatenate([c[1] for c in clouds if c[1] is not None])
    if voxel_size is not None and len(points):
        if voxel_size <= 0:
            raise XWAMError(f"fuse_views: voxel_size must be > 0 metres, got {voxel_size}")
        cloud = _to_open3d(points, colors).voxel_down_sample(voxel_size)
        points, colors = _from_open3d(cloud)
    return points, colors


def one_sided_distances(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """For each source point, the Euclidean distance (not squared) to its nearest target point: (N,)."""
    source, target = _points(source, "chamfer"), _points(target, "chamfer")
    for name, cloud in (("first", source), ("second", target)):
        if len(cloud) == 0:
            raise XWAMError(f"chamfer: the {name} point cloud is empty; nothing to compare")
        if not np.isfinite(cloud).all():
            raise XWAMError(f"chamfer: the {name} point cloud has NaN/inf coordinates")
    distances, _ = cKDTree(target).query(source, k=1, workers=-1)
    return distances


def chamfer_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Symmetric Chamfer distance in metres, lower is better, 0 for identical clouds.

    CD(A, B) = 1/2 * ( mean_{a in A} min_{b in B} |a - b|  +  mean_{b in B} min_{a in A} |a - b| ):
    the average of the two directions' MEAN Euclidean (not squared) nearest-neighbour distances.
    """
    return 0.5 * (float(one_sided_distances(a, b).mean()) + float(one_sided_distances(b, a).mean()))


# --- open3d I/O ---------------------------------------------------------------------------------


def _open3d() -> Any:
    try:
        import open3d
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise XWAMError("this needs open3d: pip install 'xwam[eval]'") from err
    return open3d


def _to_open3d(points: np.ndarray, colors: np.ndarray | None) -> open3d.geometry.PointCloud:
    o3d = _open3d()
    cloud = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.ascontiguousarray(points, np.float64)))
    if colors is not None:
        cloud.colors = o3d.utility.Vector3dVector(np.asarray(colors, np.float64) / 255.0)
    return cloud


def _from_open3d(cloud: open3d.geometry.PointCloud) -> tuple[np.ndarray, np.ndarray | None]:
    points = np.asarray(cloud.points, dtype=np.float64)
    if not cloud.has_colors():
        return points, None
    return points, np.clip(np.round(np.asarray(cloud.colors) * 255.0), 0, 255).astype(np.uint8)


def write_ply(path: str | Path, points: np.ndarray, colors: np.ndarray | None = None) -> Path:
    """Write a binary PLY point cloud (colours uint8 RGB) atomically: a crash never leaves half a file."""
    points = _points(points, "write_ply")
    if colors is not None and np.asarray(colors).shape != points.shape:
        raise XWAMError(f"write_ply: colors have shape {np.asarray(colors).shape}, expected {points.shape}")
    cloud = _to_open3d(points, colors)
    o3d = _open3d()
    with atomic_file(path) as tmp:
        if not o3d.io.write_point_cloud(str(tmp), cloud, write_ascii=False):
            raise XWAMError(f"write_ply: open3d could not write {path}")
    return Path(path)


def tsdf_mesh(
    depths: Sequence[np.ndarray],
    Ks: Sequence[np.ndarray],
    poses: Sequence[np.ndarray],
    rgbs: Sequence[np.ndarray] | None,
    voxel_size: float,
    trunc: float,
    min_weight: float = 1.0,
) -> open3d.geometry.TriangleMesh:
    """Fuse depth maps into a TSDF (open3d tensor VoxelBlockGrid) and extract its triangle mesh (legacy type).

    `trunc` is the truncation distance in metres; a voxel needs `min_weight` observations to be meshed
    (open3d's default of 3 would drop everything seen by only one or two views). Vertex colours come
    from `rgbs` if given.
    """
    if not (len(depths) == len(Ks) == len(poses)) or not depths:
        raise XWAMError(
            f"tsdf_mesh: got {len(depths)} depths, {len(Ks)} intrinsics, {len(poses)} poses; "
            "expected at least one view with one of each"
        )
    if voxel_size <= 0 or trunc <= 0:
        raise XWAMError(f"tsdf_mesh: voxel_size ({voxel_size}) and trunc ({trunc}) must be > 0 metres")
    o3d = _open3d()
    o3c = o3d.core
    with_color = rgbs is not None
    names: tuple[str, ...] = ("tsdf", "weight", "color") if with_color else ("tsdf", "weight")
    grid = o3d.t.geometry.VoxelBlockGrid(
        attr_names=names,
        attr_dtypes=[o3c.float32] * len(names),
        attr_channels=[(1,), (1,), (3,)][: len(names)],
        voxel_size=float(voxel_size),
        block_resolution=8,
        block_count=20000,
        device=o3c.Device("CPU:0"),
    )
    trunc_multiplier = float(trunc) / float(voxel_size)
    for i, (depth, K, pose) in enumerate(zip(depths, Ks, poses, strict=True)):
        z = np.where(np.isfinite(depth), depth, 0.0).astype(np.float32)
        if not (z > 0).any():
            continue
        depth_max = float(z.max()) * 1.01 + float(trunc)
        image = o3d.t.geometry.Image(o3c.Tensor(np.ascontiguousarray(z)))
        intrinsic = o3c.Tensor(_intrinsics(K, "tsdf_mesh"))
        extrinsic = o3c.Tensor(np.linalg.inv(_pose(pose, "tsdf_mesh")))  # open3d wants world-to-camera
        blocks = grid.compute_unique_block_coordinates(
            image, intrinsic, extrinsic, 1.0, depth_max, trunc_multiplier
        )
        if with_color:
            assert rgbs is not None
            color = o3d.t.geometry.Image(o3c.Tensor(np.ascontiguousarray(rgbs[i], dtype=np.float32) / 255.0))
            grid.integrate(
                blocks, image, color, intrinsic, intrinsic, extrinsic, 1.0, depth_max, trunc_multiplier
            )
        else:
            grid.integrate(blocks, image, intrinsic, extrinsic, 1.0, depth_max, trunc_multiplier)
    return grid.extract_triangle_mesh(weight_threshold=float(min_weight)).to_legacy()


# --- previews -----------------------------------------------------------------------------------


SPLAT_PX = 1  # a point covers the (2 * SPLAT_PX + 1)^2 pixels around its projection


@dataclass(frozen=True)
class RenderView:
    """A pinhole camera for previews: intrinsics, camera-to-world (OpenCV axes) and image size."""

    K: np.ndarray
    cam_to_world: np.ndarray
    height: int
    width: int


def auto_view(
    points: np.ndarray,
    height: int = 360,
    width: int = 480,
    azimuth_deg: float = -60.0,
    elevation_deg: float = 30.0,
    up: Sequence[float] = (0.0, 0.0, 1.0),
) -> RenderView:
    """A view that frames `points` from a fixed direction (azimuth about `up`, elevation above its plane)."""
    points = _points(points, "auto_view")
    points = points[np.isfinite(points).all(axis=1)]
    if len(points) == 0:
        raise XWAMError("auto_view: no finite points to frame")
    lo, hi = np.percentile(points, 1, axis=0), np.percentile(points, 99, axis=0)
    centre, radius = (lo + hi) / 2, max(float(np.linalg.norm(hi - lo)) / 2, 1e-3)
    up_ = np.asarray(up, dtype=np.float64) / np.linalg.norm(up)
    # Two axes spanning the plane orthogonal to up: azimuth 0 looks along the first one.
    helper = np.array([1.0, 0.0, 0.0]) if abs(up_[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    axis_a = helper - up_ * (helper @ up_)
    axis_a /= np.linalg.norm(axis_a)
    axis_b = np.cross(up_, axis_a)
    az, el = np.radians(azimuth_deg), np.radians(elevation_deg)
    direction = np.cos(el) * (np.cos(az) * axis_a + np.sin(az) * axis_b) + np.sin(el) * up_
    pose = look_at(centre + direction * 3.0 * radius, centre, up_)
    # Zoom so that the central 98% of the points fill 90% of the picture.
    camera = (points - pose[:3, 3]) @ pose[:3, :3]
    camera = camera[camera[:, 2] > 1e-6]
    if len(camera) == 0:
        camera = np.array([[1.0, 1.0, 1.0]])
    slope_x = max(float(np.percentile(np.abs(camera[:, 0] / camera[:, 2]), 99)), 1e-6)
    slope_y = max(float(np.percentile(np.abs(camera[:, 1] / camera[:, 2]), 99)), 1e-6)
    focal = 0.9 * min((width - 1) / 2 / slope_x, (height - 1) / 2 / slope_y)
    K = np.array([[focal, 0, (width - 1) / 2], [0, focal, (height - 1) / 2], [0, 0, 1]])
    return RenderView(K, pose, height, width)


def render_points(
    points: np.ndarray,
    colors: np.ndarray | None,
    view: RenderView,
    background: tuple[int, int, int] = (255, 255, 255),
) -> np.ndarray:
    """A (H, W, 3) uint8 picture of a cloud by z-buffered square splats of (2 * SPLAT_PX + 1) pixels.

    Points without colours are shaded by distance to the camera (near dark, far light).
    """
    points = _points(points, "render_points")
    image = np.empty((view.height, view.width, 3), np.uint8)
    image[...] = background
    if len(points) == 0:
        return image
    if colors is None:
        dist = np.linalg.norm(points - view.cam_to_world[:3, 3], axis=1)
        shade = (dist - dist.min()) / max(float(np.ptp(dist)), 1e-9)
        gray = (40 + 170 * shade).astype(np.uint8)
        colors = np.stack([gray, gray, np.full_like(gray, 200)], axis=1)
    colors = np.asarray(colors, np.uint8)
    uv, z = project(points, view.K, view.cam_to_world)
    front = z > 0
    uv, z, colors = uv[front], z[front], colors[front]
    pixel = np.round(uv).astype(np.int64)
    offsets = np.arange(-SPLAT_PX, SPLAT_PX + 1)
    du, dv = (g.ravel() for g in np.meshgrid(offsets, offsets))
    us = (pixel[:, 0:1] + du).ravel()  # (N * S,)
    vs = (pixel[:, 1:2] + dv).ravel()
    depth = np.repeat(z, len(du))
    owner = np.repeat(np.arange(len(z)), len(du))
    inside = (us >= 0) & (us < view.width) & (vs >= 0) & (vs < view.height)
    flat, depth, owner = (vs * view.width + us)[inside], depth[inside], owner[inside]
    order = np.lexsort((depth, flat))  # by pixel, nearest first
    flat, owner = flat[order], owner[order]
    first = np.ones(len(flat), bool)
    first[1:] = flat[1:] != flat[:-1]
    image.reshape(-1, 3)[flat[first]] = colors[owner[first]]
    return image


def side_by_side_png(
    path: str | Path,
    left_points: np.ndarray,
    left_colors: np.ndarray | None,
    right_points: np.ndarray,
    right_colors: np.ndarray | None,
    view: RenderView,
    titles: tuple[str, str] = ("prediction", "truth"),
) -> Path:
    """Write one PNG with two clouds seen from the SAME camera `view`, titled."""
    from PIL import Image, ImageDraw

    panels = [
        render_points(p, c, view) for p, c in ((left_points, left_colors), (right_points, right_colors))
    ]
    gap, banner = 8, 18
    canvas = Image.new("RGB", (2 * view.width + gap, view.height + banner), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (panel, title) in enumerate(zip(panels, titles, strict=True)):
        x = i * (view.width + gap)
        canvas.paste(Image.fromarray(panel), (x, banner))
        draw.text((x + 4, 3), title, fill=(0, 0, 0))
    with atomic_file(path) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)
