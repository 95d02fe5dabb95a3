"""A scene of exactly known geometry for the geometry tests: a square ground plane and a floating sphere,
ray-cast analytically (ray-plane and ray-sphere intersection) into depth maps of calibrated cameras."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xwam_core.geometry import look_at

PLANE_HALF = 0.35  # the ground is the square |x|, |y| <= PLANE_HALF at z = 0 (metres)
SPHERE_CENTRE = np.array([0.05, -0.02, 0.15])
SPHERE_RADIUS = 0.1


@dataclass
class Scene:
    depths: list[np.ndarray]  # (H, W) float32 metres, 0 where the ray misses everything
    rgbs: list[np.ndarray]  # (H, W, 3) uint8: checkerboard ground, red sphere
    Ks: list[np.ndarray]  # (3, 3)
    poses: list[np.ndarray]  # (4, 4) camera-to-world, OpenCV axes


def intrinsics(height: int, width: int, focal: float) -> np.ndarray:
    return np.array([[focal, 0, (width - 1) / 2], [0, focal, (height - 1) / 2], [0, 0, 1]])


def camera_poses() -> list[np.ndarray]:
    target = (0.0, 0.0, 0.08)
    return [look_at((0.5, -0.4, 0.42), target), look_at((-0.45, -0.45, 0.5), target)]


def ray_cast(K: np.ndarray, pose: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact depth (H, W) float64 (0 = miss) and surface id (0 miss, 1 ground, 2 sphere) per pixel centre."""
    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    rays_cam = np.linalg.solve(K, np.stack([u.ravel(), v.ravel(), np.ones(u.size)]))  # (3, P), camera z = 1
    dirs = (pose[:3, :3] @ rays_cam).T  # (P, 3) world; the ray parameter t is the camera depth
    origin = pose[:3, 3]
    t_plane = np.full(len(dirs), np.inf)
    down = dirs[:, 2] < 0
    t_plane[down] = -origin[2] / dirs[down, 2]
    hit = origin + t_plane[:, None] * dirs
    with np.errstate(invalid="ignore"):
        t_plane[~((np.abs(hit[:, 0]) <= PLANE_HALF) & (np.abs(hit[:, 1]) <= PLANE_HALF))] = np.inf
    oc = origin - SPHERE_CENTRE
    a = (dirs * dirs).sum(1)
    b = 2 * dirs @ oc
    c = oc @ oc - SPHERE_RADIUS**2
    disc = b * b - 4 * a * c
    t_sphere = np.full(len(dirs), np.inf)
    ok = disc >= 0
    t_sphere[ok] = (-b[ok] - np.sqrt(disc[ok])) / (2 * a[ok])  # near intersection; cameras are outside
    t_sphere[t_sphere <= 0] = np.inf
    depth = np.minimum(t_plane, t_sphere)
    surface = np.where(np.isinf(depth), 0, np.where(t_sphere < t_plane, 2, 1))
    depth[np.isinf(depth)] = 0.0
    return depth.reshape(height, width), surface.reshape(height, width)


def _ground_checker(K: np.ndarray, pose: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """True where the ground point seen by a pixel lies on a dark 5 cm square."""
    v, u = np.mgrid[0 : depth.shape[0], 0 : depth.shape[1]].astype(np.float64)
    rays = np.linalg.solve(K, np.stack([u.ravel(), v.ravel(), np.ones(u.size)]))
    world = (pose[:3, :3] @ (rays * depth.ravel())).T + pose[:3, 3]
    squares = np.floor(world[:, 0] / 0.05) + np.floor(world[:, 1] / 0.05)
    return (squares % 2 == 0).reshape(depth.shape)


def render(height: int = 120, width: int = 160, focal: float = 220.0) -> Scene:
    """The two cameras' depth maps (float32, as stored) and colour images."""
    K = intrinsics(height, width, focal)
    scene = Scene([], [], [], [])
    for pose in camera_poses():
        depth, surface = ray_cast(K, pose, height, width)
        rgb = np.zeros((height, width, 3), np.uint8)
        rgb[surface == 2] = (200, 40, 40)
        rgb[surface == 1] = (90, 160, 90)
        rgb[(surface == 1) & _ground_checker(K, pose, depth)] = (40, 90, 40)
        scene.depths.append(depth.astype(np.float32))
        scene.rgbs.append(rgb)
        scene.Ks.append(K)
        scene.poses.append(pose)
    return scene


def distance_to_surface(points: np.ndarray) -> np.ndarray:
    """Exact distance (N,) of points to the true surface (the ground square and the sphere)."""
    to_sphere = np.abs(np.linalg.norm(points - SPHERE_CENTRE, axis=1) - SPHERE_RADIUS)
    outside = np.maximum(np.abs(points[:, :2]) - PLANE_HALF, 0.0)  # beyond the square's edge
    to_plane = np.sqrt(points[:, 2] ** 2 + (outside**2).sum(1))
    return np.minimum(to_sphere, to_plane)


def dense_visible_surface(scene: Scene, supersample: int = 3) -> np.ndarray:
    """Exact surface points seen by the scene's cameras, sampled `supersample` times finer per axis."""
    chunks = []
    for K, pose, depth in zip(scene.Ks, scene.poses, scene.depths, strict=True):
        h, w = depth.shape
        fine = K.copy()
        fine[:2] *= supersample
        fine[:2, 2] += (supersample - 1) / 2  # the same field of view on the finer pixel grid
        fine_depth, _ = ray_cast(fine, pose, h * supersample, w * supersample)
        v, u = np.nonzero(fine_depth > 0)
        rays = np.linalg.solve(fine, np.stack([u, v, np.ones_like(u)]).astype(np.float64))
        chunks.append((pose[:3, :3] @ (rays * fine_depth[v, u])).T + pose[:3, 3])
    return np.concatenate(chunks)


def read_ply(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Points (N, 3) float64 and colours (N, 3) uint8 (None if the file has none) of a PLY file."""
    import open3d

    cloud = open3d.io.read_point_cloud(str(path), format="ply")
    points = np.asarray(cloud.points, dtype=np.float64)
    if not cloud.has_colors():
        return points, None
    return points, np.clip(np.round(np.asarray(cloud.colors) * 255.0), 0, 255).astype(np.uint8)
