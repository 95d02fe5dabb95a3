"""MetaWorldSource: expert success, camera/depth/state geometry, reproducibility, bad input.

The geometry tests render MuJoCo's own segmentation and depth of the same simulator instant (through
the on_frame hook) and check the stored images, depth, intrinsics, extrinsics and state against it.
"""

from __future__ import annotations

import numpy as np
import pytest

from xwam_core.errors import DataError

# Import the source before metaworld/mujoco: it picks the headless OpenGL backend (MUJOCO_GL).
metaworld_source = pytest.importorskip("xwam_core.data.sources.metaworld")
pytest.importorskip("metaworld")
mujoco = pytest.importorskip("mujoco")
cKDTree = pytest.importorskip("scipy.spatial").cKDTree
# The closed-loop harness imports the Policy (torch, diffusers). Importing diffusers after an EGL context
# has rendered crashes the process (segmentation fault, seen with Mesa's EGL here): import it first.
sim_metaworld = pytest.importorskip("xwam_core.sim.metaworld")

pytestmark = pytest.mark.sim

MetaWorldSource = metaworld_source.MetaWorldSource
ALL_VIEWS = list(metaworld_source.CAMERAS)
FIXED_VIEWS = ["topview", "corner", "corner2", "corner3", "corner4"]
SIZE = 64
CHECKED_FRAMES = (0, 12, 24)
# Bodies whose geoms/sites make up the gripper: fingers, pads, the rail between them and the base.
GRIPPER_BODIES = ("hand", "rightclaw", "rightpad", "leftclaw", "leftpad", "right_hand")
WRIST_BODIES = ("right_l4", "right_l5", "right_l6")  # the forearm links above the gripper
TABLE_TOP_HEIGHT = 0.0  # top face of the table box (tablelink), world z in metres


# ---------------------------------------------------------------- helpers


def project(
    point_world: np.ndarray, intrinsics: np.ndarray, cam_to_world: np.ndarray
) -> tuple[float, float, float]:
    """World point -> (u, v) pixel and camera-space depth z, OpenCV convention."""
    rotation, origin = cam_to_world[:3, :3].astype(np.float64), cam_to_world[:3, 3].astype(np.float64)
    p_cam = rotation.T @ (np.asarray(point_world, np.float64) - origin)
    k = intrinsics.astype(np.float64)
    return k[0, 0] * p_cam[0] / p_cam[2] + k[0, 2], k[1, 1] * p_cam[1] / p_cam[2] + k[1, 2], p_cam[2]


def unproject(rows: np.ndarray, cols: np.ndarray, depth: np.ndarray, intrinsics, cam_to_world) -> np.ndarray:
    """Pixels (integer centres) with depth along z -> world points (N, 3)."""
    k = intrinsics.astype(np.float64)
    z = depth.astype(np.float64)
    p_cam = np.stack([(cols - k[0, 2]) / k[0, 0] * z, (rows - k[1, 2]) / k[1, 1] * z, z], axis=1)
    return p_cam @ cam_to_world[:3, :3].astype(np.float64).T + cam_to_world[:3, 3].astype(np.float64)


def distance_to_primitives(points: np.ndarray, primitives: list[tuple]) -> np.ndarray:
    """Distance from each point to the nearest surface of boxes, spheres and cylinders (N,)."""
    best = np.full(len(points), np.inf)
    for geom_type, centre, rotation, size in primitives:
        local = (points - centre) @ rotation  # (N, 3) in the primitive's frame
        if geom_type == mujoco.mjtGeom.mjGEOM_BOX:
            excess = np.abs(local) - size
        elif geom_type == mujoco.mjtGeom.mjGEOM_CYLINDER:
            excess = np.stack(
                [np.linalg.norm(local[:, :2], axis=1) - size[0], np.abs(local[:, 2]) - size[1]], 1
            )
        elif geom_type == mujoco.mjtGeom.mjGEOM_SPHERE:
            excess = np.linalg.norm(local, axis=1, keepdims=True) - size[0]
        else:
            continue
        outside = np.linalg.norm(np.maximum(excess, 0), axis=1)
        inside = -np.max(np.minimum(excess, 0), axis=1)  # distance to the nearest face from inside
        best = np.minimum(best, np.where(np.all(excess <= 0, axis=1), inside, outside))
    return best


def rotated_180(view_frames, t: int, cam_xmat: np.ndarray) -> bool:
    """Whether the stored camera is MuJoCo's camera turned half a turn (image and camera together)."""
    stored = view_frames.extrinsics[t, :3, :3].astype(np.float64)
    as_opencv = cam_xmat @ np.diag([1.0, -1.0, -1.0])
    if np.allclose(stored, as_opencv, atol=1e-5):
        return False
    assert np.allclose(stored, as_opencv @ np.diag([-1.0, -1.0, 1.0]), atol=1e-5), "extrinsics are neither"
    return True


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def expert_episodes():
    source = MetaWorldSource(tasks=["reach-v3", "push-v3"], episodes=1, views=["corner2"], size=SIZE, seed=0)
    return source, list(source.episodes())


@pytest.fixture(scope="module")
def geometry_run():
    """reach-v3 with every camera, plus MuJoCo's own segmentation, depth and gripper geometry."""
    source = MetaWorldSource(
        tasks=["reach-v3"], episodes=1, views=ALL_VIEWS, size=SIZE, seed=0, max_steps=max(CHECKED_FRAMES) + 1
    )
    truth: dict[int, dict] = {}
    renderers: list = []

    def on_frame(env, t: int) -> None:
        if t not in CHECKED_FRAMES:
            return
        model, data = env.model, env.data
        if not renderers:
            renderers.append(mujoco.Renderer(model, SIZE, SIZE))
        renderer = renderers[0]
        gripper_bodies = {model.body(name).id for name in GRIPPER_BODIES}
        views = {}
        for view in ALL_VIEWS:
            renderer.update_scene(data, camera=view)
            renderer.enable_segmentation_rendering()
            segmentation = renderer.render().copy()  # (H, W, 2): object id, object type
            renderer.enable_depth_rendering()
            depth = renderer.render().copy()  # (H, W) metres, mujoco.Renderer's own conversion
            renderer.disable_depth_rendering()
            cam_xmat = data.cam_xmat[model.camera(view).id].reshape(3, 3).copy()
            views[view] = (segmentation, depth, cam_xmat)
        primitives, vertices = [], []
        geom_ids = [g for g in range(model.ngeom) if model.geom_bodyid[g] in gripper_bodies]
        site_ids = [s for s in range(model.nsite) if model.site_bodyid[s] in gripper_bodies]
        for g in geom_ids:
            vertices.append(_geom_vertices(model, data, g))
            if model.geom_type[g] != mujoco.mjtGeom.mjGEOM_MESH:
                rotation = data.geom_xmat[g].reshape(3, 3).copy()
                primitives.append(
                    (model.geom_type[g], data.geom_xpos[g].copy(), rotation, model.geom_size[g].copy())
                )
        for s in site_ids:
            primitives.append(
                (
                    model.site_type[s],
                    data.site_xpos[s].copy(),
                    data.site_xmat[s].reshape(3, 3).copy(),
                    model.site_size[s].copy(),
                )
            )
            vertices.append(
                data.site_xpos[s][None] + model.site_size[s][0] * np.vstack([np.eye(3), -np.eye(3)])
            )
        truth[t] = {
            "views": views,
            "primitives": primitives,
            "gripper_points": np.concatenate(vertices),  # (N, 3) points spanning the gripper's extent
            "geom_ids": np.array(geom_ids),
            "site_ids": np.array(site_ids),
            "wrist_geom_ids": np.array(
                [g for g in range(model.ngeom) if model.body(model.geom_bodyid[g]).name in WRIST_BODIES]
            ),
            "wrist_points": np.concatenate(
                [
                    _geom_vertices(model, data, g)
                    for g in range(model.ngeom)
                    if model.body(model.geom_bodyid[g]).name in WRIST_BODIES
                ]
            ),
            "mesh_ids": np.array([g for g in geom_ids if model.geom_type[g] == mujoco.mjtGeom.mjGEOM_MESH]),
            "table_geom": _table_top_geom(model),
            "table_box": (
                mujoco.mjtGeom.mjGEOM_BOX,
                data.geom_xpos[_table_top_geom(model)].copy(),
                data.geom_xmat[_table_top_geom(model)].reshape(3, 3).copy(),
                model.geom_size[_table_top_geom(model)].copy(),
            ),
            "hand_xpos": data.body("hand").xpos.copy(),
        }

    try:
        episode = next(source.episodes(on_frame=on_frame))
    finally:
        for renderer in renderers:
            renderer.close()
    return episode, truth


def _geom_vertices(model, data, geom: int) -> np.ndarray:
    """World points spanning one geom: its mesh vertices, or the corners of its size box."""
    rotation, centre = data.geom_xmat[geom].reshape(3, 3), data.geom_xpos[geom]
    if model.geom_type[geom] == mujoco.mjtGeom.mjGEOM_MESH:
        mesh = model.geom_dataid[geom]
        start, count = model.mesh_vertadr[mesh], model.mesh_vertnum[mesh]
        local = model.mesh_vert[start : start + count]
    else:
        local = np.array(np.meshgrid(*[[-1, 1]] * 3)).reshape(3, -1).T * model.geom_size[geom]
    return local @ rotation.T + centre


def _table_top_geom(model) -> int:
    """The table's top box: the tablelink box whose top face is at z = 0."""
    body = model.body("tablelink").id
    for g in range(model.ngeom):
        top = model.geom_pos[g][2] + model.geom_size[g][2]
        is_box = model.geom_type[g] == mujoco.mjtGeom.mjGEOM_BOX
        if (
            model.geom_bodyid[g] == body
            and is_box
            and abs(top - TABLE_TOP_HEIGHT) < 1e-6
            and model.geom_group[g] < 3
        ):
            return g
    raise AssertionError("no table top geom")


def gripper_mask(segmentation: np.ndarray, frame_truth: dict) -> np.ndarray:
    ids, types = segmentation[..., 0], segmentation[..., 1]
    geoms = (types == mujoco.mjtObj.mjOBJ_GEOM) & np.isin(ids, frame_truth["geom_ids"])
    sites = (types == mujoco.mjtObj.mjOBJ_SITE) & np.isin(ids, frame_truth["site_ids"])
    return geoms | sites


def aligned(episode, frame_truth: dict, view: str, t: int):
    """MuJoCo's segmentation and depth turned like the stored image (half a turn where the camera was)."""
    segmentation, depth, cam_xmat = frame_truth["views"][view]
    if rotated_180(episode.views[view], t, cam_xmat):
        return segmentation[::-1, ::-1], depth[::-1, ::-1]
    return segmentation, depth


# ---------------------------------------------------------------- 1. expert success


def test_experts_succeed_and_episodes_validate(expert_episodes):
    source, episodes = expert_episodes
    assert [e.task for e in episodes] == ["reach-v3", "push-v3"]
    info = source.info()
    assert info.name == "metaworld" and info.robot_type == "sawyer"
    assert info.fps == pytest.approx(80.0)  # 1 / (frame_skip 5 * timestep 2.5 ms)
    assert info.views == ["corner2"] and info.image_size == (SIZE, SIZE) and info.num_episodes == 2
    assert len(info.state_names) == 8 and len(info.action_names) == 4 and info.has_depth and info.has_cameras
    for episode in episodes:
        episode.validate(where=episode.task)
        assert episode.success, f"{episode.task}: the scripted expert did not succeed"
        success_frame = episode.extra["success_frame"]
        assert 0 < success_frame < episode.length
        # Ends a few frames after success but keeps room for 9-frame windows at stride 4.
        assert episode.length == max(
            metaworld_source.MIN_FRAMES, success_frame + metaworld_source.FRAMES_AFTER_SUCCESS
        )
        assert episode.fps == info.fps
        assert episode.state.dtype == np.float32 and episode.state.shape == (episode.length, 8)
        assert episode.action.dtype == np.float32 and np.abs(episode.action).max() <= 1.0
        assert (episode.state[:, 3] > 0).all()  # quaternion w > 0
        assert np.allclose(np.linalg.norm(episode.state[:, 3:7], axis=1), 1.0, atol=1e-5)
        view = episode.views["corner2"]
        assert view.depth.dtype == np.float32 and view.intrinsics.dtype == np.float32
        assert view.extrinsics.dtype == np.float32
        # The hand follows the applied actions (1 cm per unit per step, through a lagging mocap weld).
        moved = np.diff(episode.state[:, :3], axis=0)
        assert np.corrcoef(moved.ravel(), episode.action[:-1, :3].ravel())[0, 1] > 0.7


# ---------------------------------------------------------------- 2. geometry


def test_depth_is_mujocos_metric_depth(geometry_run):
    """Stored depth equals mujoco.Renderer's depth pass (metres along z); background is 0."""
    episode, truth = geometry_run
    for t, frame_truth in truth.items():
        for view in ALL_VIEWS:
            _, reference = aligned(episode, frame_truth, view, t)
            stored = episode.views[view].depth[t]
            valid = stored > 0
            assert valid.mean() > 0.5, f"{view}: too little valid depth"
            np.testing.assert_allclose(stored[valid], reference[valid], rtol=1e-6, err_msg=view)
            assert (reference[~valid] > 20.0).all(), f"{view}: a real surface was marked invalid"


def test_gripper_pixels_unproject_onto_the_gripper(geometry_run):
    """Every gripper pixel, unprojected with the stored depth, K and camera-to-world, lies on the
    simulator's gripper geometry. Segmentation and depth sample the same pixel centres, so the only
    error is depth precision: 2 mm is strict (half a pixel off would be ~1.5 cm at 1.7 m)."""
    episode, truth = geometry_run
    for t, frame_truth in truth.items():
        for view in ALL_VIEWS:
            frames = episode.views[view]
            segmentation, _ = aligned(episode, frame_truth, view, t)
            # The gripper base is a mesh without an analytic surface here: check the primitives only.
            on_mesh = (segmentation[..., 1] == mujoco.mjtObj.mjOBJ_GEOM) & np.isin(
                segmentation[..., 0], frame_truth["mesh_ids"]
            )
            rows, cols = np.nonzero(gripper_mask(segmentation, frame_truth) & ~on_mesh)
            if view != "topview":  # from above, the wrist hides the fingers
                assert len(rows) >= 2, f"{view} frame {t}: gripper not visible"
            if len(rows) == 0:
                continue
            points = unproject(
                rows, cols, frames.depth[t][rows, cols], frames.intrinsics[t], frames.extrinsics[t]
            )
            distance = distance_to_primitives(points, frame_truth["primitives"])
            assert distance.max() < 0.002, (
                f"{view} frame {t}: gripper pixels {distance.max() * 100:.2f} cm off"
            )


def test_end_effector_state_projects_onto_the_gripper(geometry_run):
    """state[t, :3] (the hand) projected with each view's stored K and camera-to-world lands on the
    gripper, and the depth of the gripper seen there matches the hand's camera-space depth."""
    episode, truth = geometry_run
    for t, frame_truth in truth.items():
        hand = episode.state[t, :3].astype(np.float64)
        np.testing.assert_allclose(hand, frame_truth["hand_xpos"], atol=1e-6)  # state is this instant's
        for view in ALL_VIEWS:
            frames = episode.views[view]
            k, cam_to_world = frames.intrinsics[t], frames.extrinsics[t]
            u, v, z = project(hand, k, cam_to_world)
            assert z > 0 and -0.5 <= u < SIZE - 0.5 and -0.5 <= v < SIZE - 0.5, (
                f"{view} frame {t}: ({u}, {v})"
            )
            segmentation, _ = aligned(episode, frame_truth, view, t)
            # The hand point sits between the fingers (5 cm either side): search a window that spans
            # 6 cm at the hand's depth, plus one pixel for rounding.
            radius = int(np.ceil(k[0, 0] * 0.06 / z)) + 1
            row, col = round(v), round(u)
            window = (
                slice(max(row - radius, 0), row + radius + 1),
                slice(max(col - radius, 0), col + radius + 1),
            )
            depth_seen = frames.depth[t][window]
            if view == "topview":
                # Seen from straight above, the forearm and wrist bend over the gripper and hide it:
                # the window shows them instead: in front of the hand, and no nearer than the wrist's
                # own geometry reaches towards the camera (2 cm for depth and pixel sampling).
                wrist = np.isin(segmentation[..., 0], frame_truth["wrist_geom_ids"]) & (
                    segmentation[..., 1] == mujoco.mjtObj.mjOBJ_GEOM
                )
                seen = wrist[window] | gripper_mask(segmentation, frame_truth)[window]
                assert seen.mean() > 0.5, f"topview frame {t}: the window is not on the wrist/gripper"
                points = np.concatenate([frame_truth["gripper_points"], frame_truth["wrist_points"]])
                z_front = project_many(points, k, cam_to_world)[2].min()
                occluder = depth_seen[seen].min()
                assert z_front - 0.02 <= occluder < z, f"topview frame {t}: {occluder:.3f} m, hand {z:.3f} m"
                continue
            in_window = gripper_mask(segmentation, frame_truth)[window]
            assert in_window.any(), f"{view} frame {t}: no gripper pixel within {radius} px of the hand"
            nearest_seen = depth_seen[in_window].min()
            # The nearest gripper surface seen around the hand is in front of the hand by at most the
            # gripper's own extent towards the camera (from the simulator's geometry: fingers, rail,
            # base), and at most 2 cm behind it: the fingers, rail and base surround the hand point.
            _, _, z_points = project_many(frame_truth["gripper_points"], k, cam_to_world)
            extent_in_front = z - z_points.min()
            assert z - extent_in_front - 0.02 <= nearest_seen <= z + 0.02, (
                f"{view} frame {t}: gripper seen at {nearest_seen:.3f} m, hand at {z:.3f} m, "
                f"gripper reaches {extent_in_front:.3f} m towards the camera"
            )


def project_many(points: np.ndarray, intrinsics, cam_to_world):
    rotation, origin = cam_to_world[:3, :3].astype(np.float64), cam_to_world[:3, 3].astype(np.float64)
    p_cam = (points - origin) @ rotation
    k = intrinsics.astype(np.float64)
    return (
        k[0, 0] * p_cam[:, 0] / p_cam[:, 2] + k[0, 2],
        k[1, 1] * p_cam[:, 1] / p_cam[:, 2] + k[1, 2],
        p_cam[:, 2],
    )


def test_views_agree_on_the_table(geometry_run):
    """corner2's and topview's depth, unprojected to the world, describe the same table top."""
    episode, truth = geometry_run
    frame_truth = truth[0]
    clouds = {}
    for view in ("corner2", "topview"):
        frames = episode.views[view]
        segmentation, _ = aligned(episode, frame_truth, view, 0)
        table = (segmentation[..., 1] == mujoco.mjtObj.mjOBJ_GEOM) & (
            segmentation[..., 0] == frame_truth["table_geom"]
        )
        rows, cols = np.nonzero(table & (frames.depth[0] > 0))
        points = unproject(
            rows, cols, frames.depth[0][rows, cols], frames.intrinsics[0], frames.extrinsics[0]
        )
        # Absolute check: every table pixel lies on the simulator's table box (top face and edges).
        assert distance_to_primitives(points, [frame_truth["table_box"]]).max() < 0.002, view
        clouds[view] = points[np.abs(points[:, 2] - TABLE_TOP_HEIGHT) < 0.001]  # the top face only
        assert len(clouds[view]) > 100, f"{view}: sees too little of the table"
    distances, _ = cKDTree(clouds["topview"]).query(clouds["corner2"])
    # topview samples the table every ~1.7 cm at 64 px: nearest neighbours on the same plane are
    # ~0.6 cm apart when the views agree; a wrong camera moves whole regions by many centimetres.
    assert np.median(distances) < 0.01, f"median nearest-neighbour distance {np.median(distances):.4f} m"


def test_world_up_points_up_in_every_fixed_view(geometry_run):
    """World +z projects towards row 0 in each tilted camera (and behindGripper, which keeps its world
    orientation); topview looks straight down, so there the far side of the table (+y) is up."""
    episode, _ = geometry_run
    for view in [*FIXED_VIEWS, "behindGripper"]:
        frames = episode.views[view]
        k, cam_to_world = frames.intrinsics[0], frames.extrinsics[0]
        base = episode.state[0, :3].astype(np.float64)
        step = np.array([0.0, 0.1, 0.0]) if view == "topview" else np.array([0.0, 0.0, 0.1])
        u0, v0, _ = project(base, k, cam_to_world)
        u1, v1, _ = project(base + step, k, cam_to_world)
        assert v1 < v0 - 1.0 and abs(v1 - v0) > abs(u1 - u0) * 0.5, (
            f"{view}: up goes ({u1 - u0:.1f}, {v1 - v0:.1f}) px"
        )


def test_intrinsics_follow_fovy(geometry_run):
    episode, _ = geometry_run
    for view, fovy in (("corner2", 60.0), ("topview", 45.0), ("gripperPOV", 90.0)):
        k = episode.views[view].intrinsics
        assert k.shape == (episode.length, 3, 3)
        focal = (SIZE / 2) / np.tan(np.radians(fovy) / 2)
        np.testing.assert_allclose(
            k[0], [[focal, 0, (SIZE - 1) / 2], [0, focal, (SIZE - 1) / 2], [0, 0, 1]], rtol=1e-6
        )
    wrist = episode.views["behindGripper"].extrinsics[:, :3, 3]
    assert np.linalg.norm(wrist[-1] - wrist[0]) > 0.01  # wrist cameras move with the hand


# ---------------------------------------------------------------- 3. reproducibility


def _short_run(seed: int):
    source = MetaWorldSource(
        tasks=["reach-v3"], episodes=2, views=["topview"], size=SIZE, seed=seed, max_steps=6
    )
    return list(source.episodes())


def test_same_seed_same_arrays_different_seed_different():
    first, again, other = _short_run(0), _short_run(0), _short_run(1)
    for a, b in zip(first, again, strict=True):
        for key in ("rgb", "depth", "intrinsics", "extrinsics"):
            np.testing.assert_array_equal(getattr(a.views["topview"], key), getattr(b.views["topview"], key))
        np.testing.assert_array_equal(a.state, b.state)
        np.testing.assert_array_equal(a.action, b.action)
    assert not np.array_equal(first[0].action, first[1].action)  # episodes of one run differ
    assert not np.array_equal(first[0].action, other[0].action)
    assert not np.array_equal(first[0].views["topview"].rgb, other[0].views["topview"].rgb)


def test_episode_seed_depends_only_on_seed_task_and_index():
    one = MetaWorldSource(tasks=["reach-v3"], episodes=1, views=["topview"], seed=3)
    two = MetaWorldSource(tasks=["push-v3", "reach-v3"], episodes=1, views=["corner"], seed=3)
    assert one.episode_seed("reach-v3", 0) == two.episode_seed("reach-v3", 0)
    assert one.episode_seed("reach-v3", 0) != one.episode_seed("reach-v3", 1)


def test_default_quality_depth_matches_fast():
    """'default' adds shadows, reflections and multisampling to RGB only; depth is the same."""
    runs = {
        quality: next(
            MetaWorldSource(
                tasks=["reach-v3"],
                episodes=1,
                views=["corner"],
                size=SIZE,
                max_steps=1,
                render_quality=quality,
            ).episodes()
        )
        for quality in ("fast", "default")
    }
    fast, default = runs["fast"].views["corner"], runs["default"].views["corner"]
    np.testing.assert_array_equal(fast.depth, default.depth)
    assert not np.array_equal(fast.rgb, default.rgb)


# ---------------------------------------------------------------- 4. bad input


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"tasks": ["reach-v2"]}, "reach-v2"),
        ({"tasks": ["rech-v3"]}, "reach-v3"),  # the closest valid name is suggested
        ({"views": ["frontview"]}, "frontview"),
        ({"size": 32}, "32"),
        ({"size": 300}, "300"),
        ({"episodes": 0}, "episodes=0"),
        ({"render_quality": "ultra"}, "ultra"),
        ({"max_steps": 0}, "max_steps=0"),
        ({"tasks": "reach-v3"}, "reach-v3"),
        ({"state": "joint"}, "state='joint'"),
    ],
)
def test_bad_input_raises_data_error(kwargs, named):
    options = {"tasks": ["reach-v3"], "episodes": 1, "views": ["corner2"], **kwargs}
    with pytest.raises(DataError) as error:
        MetaWorldSource(**options)
    message = str(error.value)
    assert named in message and "\n" not in message
    if "views" in kwargs:
        assert "corner2" in message and "gripperPOV" in message  # lists the valid camera names


# ---------------------------------------------------------------- 5. state layouts (state = "task")


@pytest.fixture(scope="module")
def task_state_runs():
    """reach-v3 and push-v3, 1 episode of 4 frames each, recorded with state='hand' and state='task',
    plus the object body's pose and the env's goal at every frame of the 'task' run."""
    truth: list[dict] = []

    def on_frame(env, t: int) -> None:
        body = env.data.body("obj")
        truth.append(
            {"obj_pos": body.xpos.copy(), "obj_quat": body.xquat.copy(), "goal": env._target_pos.copy()}
        )

    options = {"tasks": ["reach-v3", "push-v3"], "episodes": 1, "views": ["topview"], "size": SIZE}
    hand_source = MetaWorldSource(**options, max_steps=4)
    task_source = MetaWorldSource(**options, max_steps=4, state="task")
    return hand_source, list(hand_source.episodes()), task_source, list(task_source.episodes(on_frame)), truth


def test_task_state_holds_object_and_goal(task_state_runs):
    hand_source, hand_episodes, task_source, task_episodes, truth = task_state_runs
    names = task_source.info().state_names
    assert names == [
        *metaworld_source.STATE_NAMES,
        *("obj_x", "obj_y", "obj_z", "obj_qw", "obj_qx", "obj_qy", "obj_qz", "goal_x", "goal_y", "goal_z"),
    ]
    assert hand_source.info().state_names == metaworld_source.STATE_NAMES
    assert task_source.info().extra["state"] == "task" and hand_source.info().extra["state"] == "hand"
    frames = [t for episode in task_episodes for t in range(len(episode.state))]
    assert len(frames) == len(truth) == 8
    states = np.concatenate([episode.state for episode in task_episodes])  # (8, 18)
    assert states.shape == (8, len(names))
    for state, frame in zip(states, truth, strict=True):
        np.testing.assert_allclose(state[8:11], frame["obj_pos"], atol=1e-6)
        quat = frame["obj_quat"] * np.sign(frame["obj_quat"][0])  # the body's (w, x, y, z), w >= 0
        np.testing.assert_allclose(state[11:15], quat, atol=1e-6)
        assert state[11] >= 0
        np.testing.assert_allclose(state[15:18], frame["goal"], atol=1e-6)
    # the goal is drawn per episode and differs from the hand's start
    assert np.linalg.norm(states[0, 15:18] - states[0, :3]) > 0.05
    for hand, task in zip(hand_episodes, task_episodes, strict=True):
        np.testing.assert_array_equal(task.state[:, :8], hand.state)  # the hand part is unchanged
        np.testing.assert_array_equal(task.action, hand.action)
        np.testing.assert_array_equal(task.views["topview"].rgb, hand.views["topview"].rgb)


def test_task_state_matches_metaworlds_observation():
    """Object position, quaternion (reordered to w, x, y, z) and goal are those of env._get_obs()."""
    sim = metaworld_source._sim()
    gl = metaworld_source.gl_context(SIZE, SIZE)
    try:
        gl.make_current()
        for task in ("reach-v3", "push-v3"):
            task_sim = metaworld_source.TaskSim(sim, task, ["topview"], SIZE, SIZE, "fast", "task")
            try:
                task_sim.reset(7)
                state, obs = task_sim.state(), task_sim.env._get_obs()
                assert task_sim.quat_scalar_last  # Meta-World returns scipy's (x, y, z, w) here
                np.testing.assert_allclose(state[:3], obs[:3])  # hand
                np.testing.assert_allclose(state[7], obs[3])  # gripper opening
                np.testing.assert_allclose(state[8:11], obs[4:7])  # first object's position
                np.testing.assert_allclose(state[11:15], obs[[10, 7, 8, 9]] * np.sign(obs[10]))
                np.testing.assert_allclose(state[15:18], obs[-3:])  # goal
                np.testing.assert_array_equal(task_sim.state("hand"), state[:8])
            finally:
                task_sim.free()
    finally:
        gl.free()


def test_closed_loop_builds_the_recorded_task_state(task_state_runs):
    """Same seed: the harness's observe() gives the recorded frame 0's 18-D state, bit for bit."""
    task_episodes = task_state_runs[3]
    gl = metaworld_source.gl_context(SIZE, SIZE)
    try:
        gl.make_current()
        episode = task_episodes[1]  # push-v3
        task_sim = metaworld_source.TaskSim(
            metaworld_source._sim(), "push-v3", ["topview"], SIZE, SIZE, "fast", "task"
        )
        try:
            task_sim.reset(int(episode.extra["episode_seed"]))
            rgb, state = sim_metaworld.observe(task_sim, gl)
        finally:
            task_sim.free()
    finally:
        gl.free()
    np.testing.assert_array_equal(rgb[0], episode.views["topview"].rgb[0])
    np.testing.assert_array_equal(state, episode.state[0])


def _stub_policy(state_names: list[str]):
    from types import SimpleNamespace

    return SimpleNamespace(
        spec=SimpleNamespace(views=["corner2"], image_size=(64, 64), tasks=["reach-v3"]),
        normalizer=SimpleNamespace(action_dim=4, state_names=list(state_names)),
    )


def test_closed_loop_picks_the_layout_from_the_state_names():
    from xwam_core.errors import XWAMError

    _check, state_layout = sim_metaworld._check, sim_metaworld.state_layout

    assert state_layout(_stub_policy(metaworld_source.STATE_NAMES)) == "hand"
    assert state_layout(_stub_policy(metaworld_source.TASK_STATE_NAMES)) == "task"
    _check(_stub_policy(metaworld_source.TASK_STATE_NAMES), ["reach-v3"], 1, 10)
    for names in (["s0", "s1"], [*metaworld_source.STATE_NAMES, "goal_x", "goal_y", "goal_z"]):
        with pytest.raises(XWAMError) as error:
            _check(_stub_policy(names), ["reach-v3"], 1, 10)
        message = str(error.value)
        assert "\n" not in message and str(names) in message
        assert "hand: ee_x" in message and "obj_qw" in message and "goal_z" in message


@pytest.mark.parametrize("value", ["joint", "", "Task"])
def test_recipe_state_is_validated(value):
    from xwam_core.errors import RecipeError
    from xwam_core.recipe import load_recipe

    assert load_recipe(None, ['prepare.metaworld.state="task"']).prepare.metaworld.state == "task"
    assert load_recipe(None, []).prepare.metaworld.state == "hand"
    with pytest.raises(RecipeError) as error:
        load_recipe(None, [f"prepare.metaworld.state={value!r}"])
    message = str(error.value)
    assert "prepare.metaworld.state" in message and "'task'" in message and "\n" not in message
