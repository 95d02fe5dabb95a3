"""`data.normalization`: the store's quantiles ("quantile") or the X-WAM release's rules ("release"), and
one-arm data in a two-arm model: the empty arm's slots are masked out of the losses."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from tests.conftest import SyntheticSource, write_store
from xwam_core.data.episode import Episode
from xwam_core.data.reader import EpisodeStore
from xwam_core.data.release_stats import build_normalizer, release_quantiles
from xwam_core.data.sources.base import SourceInfo
from xwam_core.data.windows import WindowDataset, WindowLayout, collate_windows
from xwam_core.errors import DataError, RecipeError
from xwam_core.normalizer import Normalizer

ARM_STATE = ("ee_x", "ee_y", "ee_z", "ee_qw", "ee_qx", "ee_qy", "ee_qz", "gripper")
ARM_ACTION = ("dx", "dy", "dz", "drx", "dry", "drz", "gripper")
STATE_NAMES = [f"{a}_{n}" for a in ("left", "right") for n in ARM_STATE]
ACTION_NAMES = [f"{a}_{n}" for a in ("left", "right") for n in ARM_ACTION]
LENGTHS = [1500, 1000]  # the gripper moves in under 1 % of the steps, as in real demonstrations
STORE_LENGTHS = [60, 40]
OUTLIER = 50.0  # a gripper action on an episode's last frame: no next frame, so never a moving step


def release_like_data(lengths: list[int] = LENGTHS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, 14) actions, (N, 16) states for episodes of these lengths: positive-skewed deltas, unit
    quaternions, grippers held still except in three 4-step ramps (open, close, open), and the release's
    gripper action a[t] = g[t + 1] - g[t] with an outlier on each episode's last frame."""
    rng = np.random.default_rng(seed)
    states, actions = [], []
    for n in lengths:
        s = np.zeros((n, 16))
        a = np.zeros((n, 14))
        for arm, high in ((0, 1.0), (1, 0.5)):
            s[:, 8 * arm : 8 * arm + 3] = rng.normal(size=(n, 3))
            xyzw = Rotation.random(n, random_state=int(rng.integers(1000))).as_quat()
            s[:, 8 * arm + 3 : 8 * arm + 7] = np.concatenate([xyzw[:, 3:], xyzw[:, :3]], 1)
            steps = np.zeros(n)
            for start, sign in ((n // 6, 1), (n // 2, -1), (3 * n // 4, 1)):
                steps[start : start + 4] = sign * high * rng.uniform(0.05, 0.3, 4)
            g = 0.5 * high + np.concatenate([[0.0], np.cumsum(steps[:-1])])
            g += rng.normal(0, 1e-5, n)  # sensor noise far below the static threshold
            s[:, 8 * arm + 7] = g
            a[:, 7 * arm : 7 * arm + 3] = rng.uniform(0.2, 1.0, (n, 3))  # skewed: symmetric bounds matter
            a[:, 7 * arm + 3 : 7 * arm + 6] = rng.uniform(-0.3, 0.1, (n, 3))
            a[:-1, 7 * arm + 6] = g[1:] - g[:-1]
            a[-1, 7 * arm + 6] = OUTLIER
        states.append(s)
        actions.append(a)
    return np.concatenate(actions), np.concatenate(states)


def expected_release_bounds(
    action: np.ndarray, state: np.ndarray, lengths: list[int] = LENGTHS
) -> tuple[np.ndarray, ...]:
    """The release's rules written out directly (scripts/compute_stats.py's arithmetic, loops per episode)."""
    s01, s99 = np.quantile(state, 0.01, 0), np.quantile(state, 0.99, 0)
    grips = np.concatenate([state[:, 7], state[:, 15]])
    gq01, gq99 = np.quantile(grips, 0.01), np.quantile(grips, 0.99)
    s01[[7, 15]], s99[[7, 15]] = gq01, gq99
    s01[[3, 4, 5, 6, 11, 12, 13, 14]], s99[[3, 4, 5, 6, 11, 12, 13, 14]] = -1.0, 1.0
    m = np.maximum(np.abs(np.quantile(action, 0.01, 0)), np.abs(np.quantile(action, 0.99, 0)))
    kept = []
    start = 0
    for n in lengths:
        for arm in (0, 1):
            g = state[start : start + n, 8 * arm + 7]
            for t in range(n - 1):
                if abs(2 * (g[t + 1] - g[t]) / (gq99 - gq01)) >= 0.01:
                    kept.append(action[start + t, 7 * arm + 6])
        start += n
    kept_arr = np.asarray(kept)
    mg = max(abs(np.quantile(kept_arr, 0.01)), abs(np.quantile(kept_arr, 0.99)))
    m[[6, 13]] = mg
    return -m, m, s01, s99, kept_arr


def test_release_quantiles_follow_the_release_rules():
    action, state = release_like_data()
    got = release_quantiles(action, state, LENGTHS, ACTION_NAMES, STATE_NAMES)
    a01, a99, s01, s99, kept = expected_release_bounds(action, state)
    np.testing.assert_allclose(got["action"]["q01"], a01, rtol=1e-12)
    np.testing.assert_allclose(got["action"]["q99"], a99, rtol=1e-12)
    np.testing.assert_allclose(got["state"]["q01"], s01, rtol=1e-12)
    np.testing.assert_allclose(got["state"]["q99"], s99, rtol=1e-12)
    # quaternions: identity; action bounds symmetric, even where the data are one-sided
    assert got["state"]["q01"][3:7] == [-1.0] * 4 and got["state"]["q99"][11:15] == [1.0] * 4
    assert np.allclose(np.asarray(got["action"]["q01"]), -np.asarray(got["action"]["q99"]))
    assert got["action"]["q01"][0] < -0.9 and action[:, 0].min() > 0
    # gripper states: one pooled pair for both arms
    assert (
        got["state"]["q01"][7] == got["state"]["q01"][15]
        and got["state"]["q99"][7] == got["state"]["q99"][15]
    )
    # the gripper actions' bounds come from the 48 moving steps only (3 ramps x 4 steps x 2 arms x 2
    # episodes), shared by both arms; over every step the static ones (> 99 %) would make them noise-sized
    assert kept.size == 48 and OUTLIER not in kept
    bound = got["action"]["q99"][6]
    assert got["action"]["q99"][13] == bound and 0.1 < bound < 0.3
    grip = np.concatenate([action[:-1, 6], action[:-1, 13]])
    assert max(abs(np.quantile(grip, 0.01)), abs(np.quantile(grip, 0.99))) < 1e-3
    # an episode's last frame never counts: with the two outliers the bound would be far larger
    with_last = np.concatenate([kept, [OUTLIER, OUTLIER]])
    assert max(abs(np.quantile(with_last, 0.01)), abs(np.quantile(with_last, 0.99))) > 10 * bound


def test_gripper_without_a_matching_state_uses_every_step():
    rng = np.random.default_rng(1)
    action, state = rng.normal(size=(30, 2)), rng.normal(size=(30, 3))
    got = release_quantiles(action, state, [30], ["x", "gripper"], ["a", "b", "c"])
    m = max(abs(np.quantile(action[:, 1], 0.01)), abs(np.quantile(action[:, 1], 0.99)))
    assert got["action"]["q99"][1] == pytest.approx(m) and got["action"]["q01"][1] == pytest.approx(-m)
    assert got["state"]["q01"] == pytest.approx(np.quantile(state, 0.01, 0).tolist())


class NamedSource(SyntheticSource):
    """SyntheticSource's frames with given state/action names and values, one array per episode."""

    def __init__(self, states, actions, state_names, action_names):
        super().__init__(episodes=len(states), length=len(states[0]), size=(32, 32), views=("a",))
        self.lengths = [len(s) for s in states]
        self.states, self.actions = states, actions
        self.state_names, self.action_names = state_names, action_names

    def info(self) -> SourceInfo:
        return dataclasses.replace(
            super().info(), state_names=self.state_names, action_names=self.action_names
        )

    def episodes(self) -> Iterator[Episode]:
        rng = np.random.default_rng(0)
        from tests.conftest import synthetic_episode

        for i, (s, a) in enumerate(zip(self.states, self.actions, strict=True)):
            ep = synthetic_episode(rng, len(s), self.size, self.views, self.tasks[i % 2])
            ep.state, ep.action = s.astype(np.float32), a.astype(np.float32)
            yield ep


@pytest.fixture(scope="module")
def release_store(tmp_path_factory):
    action, state = release_like_data(STORE_LENGTHS)
    cut = STORE_LENGTHS[0]
    path = tmp_path_factory.mktemp("relnorm") / "store"
    write_store(
        path, NamedSource([state[:cut], state[cut:]], [action[:cut], action[cut:]], STATE_NAMES, ACTION_NAMES)
    )
    return path, action.astype(np.float32), state.astype(np.float32)


def test_windows_normalize_with_the_chosen_bounds(release_store):
    path, action, state = release_store
    layout = WindowLayout(2, 4)
    raw = WindowDataset(path, layout, normalize=False)[3]
    quant = WindowDataset(path, layout)
    rel = WindowDataset(path, layout, normalization="release")
    store = EpisodeStore(path)
    assert quant.normalizer.normalization == "quantile"
    assert quant.normalizer.stats["action"]["q01"] == store.stats["action"]["q01"]
    assert rel.normalizer.normalization == "release"
    # the store's float32 values: the bounds the windows use are computed from what the store holds
    want = release_quantiles(action, state, STORE_LENGTHS, ACTION_NAMES, STATE_NAMES)
    for key in ("action", "state"):
        for q in ("q01", "q99"):
            np.testing.assert_allclose(rel.normalizer.stats[key][q], want[key][q], rtol=1e-6, atol=1e-7)
    # mean/std/min/max stay the store's (the mean-action baseline)
    assert rel.normalizer.stats["action"]["mean"] == store.stats["action"]["mean"]
    item = rel[3]
    q = [3, 4, 5, 6, 11, 12, 13, 14]
    np.testing.assert_allclose(item["states"][:, q], raw["states"][:, q], atol=1e-6)  # identity
    a01, a99 = (np.asarray(rel.normalizer.stats["action"][k]) for k in ("q01", "q99"))
    np.testing.assert_allclose(item["actions"], 2 * (raw["actions"] - a01) / (a99 - a01) - 1, atol=1e-5)
    np.testing.assert_allclose(item["actions"], raw["actions"] / a99, atol=1e-5)  # symmetric: x / M
    back = rel.normalizer.action.denormalize(item["actions"])
    np.testing.assert_allclose(back, raw["actions"], atol=1e-5)
    with pytest.raises(DataError, match="normalization 'minmax'; expected one of quantile, release"):
        WindowDataset(path, layout, normalization="minmax")


def test_the_normalizer_json_says_which_normalization(release_store):
    path, _, _ = release_store
    rel = WindowDataset(path, WindowLayout(2, 4), normalization="release").normalizer
    data = json.loads(json.dumps(rel.to_json()))
    assert data["normalization"] == "release" and "X-WAM release" in data["rule"]
    back = Normalizer.from_json(data)
    assert back.normalization == "release" and back.stats == rel.stats
    quant = WindowDataset(path, WindowLayout(2, 4)).normalizer.to_json()
    assert quant["normalization"] == "quantile" and "1st/99th percentiles" in quant["rule"]
    old = {k: v for k, v in quant.items() if k != "normalization"}  # checkpoints from before the setting
    assert Normalizer.from_json(old).normalization == "quantile"
    with pytest.raises(ValueError, match="normalization 'x'"):
        build_normalizer(EpisodeStore(path).stats, ACTION_NAMES, STATE_NAMES, "x")


def test_recipe_setting_is_checked():
    from xwam_core.recipe import load_recipe

    assert load_recipe(None, []).data.normalization == "quantile"
    assert load_recipe(None, ["data.normalization='release'"]).data.normalization == "release"
    with pytest.raises(RecipeError) as err:
        load_recipe(None, ["data.normalization='minmax'"])
    line = str(err.value)
    assert "\n" not in line and "data.normalization" in line and "'minmax'" in line
    assert "one of quantile, release" in line


def test_one_arm_fills_the_left_slots_and_the_rest_is_masked(tmp_path):
    """7-D actions / 8-D states in a 14 / 16-D model: the padded slots never reach the action or state
    loss, whatever the model predicts there; the real slots do."""
    from xwam_core.factory import build_codec, build_model, build_text, layout_for
    from xwam_core.objective import TrainingObjective
    from xwam_core.recipe import ModelConfig
    from xwam_core.schedule.sampler import NoiseSamplerConfig

    action, state = release_like_data(STORE_LENGTHS)
    path = tmp_path / "store"
    states = [state[:12, :8], state[12:24, :8]]
    actions = [action[:12, :7], action[12:24, :7]]
    write_store(path, NamedSource(states, actions, STATE_NAMES[:8], ACTION_NAMES[:7]))
    store, window = EpisodeStore(path), WindowLayout(4, 2)
    cfg = ModelConfig(
        preset="tiny", action_dim=14, state_dim=16, overrides={"num_layers": 1, "num_depth_blocks": 1}
    )
    layout = layout_for(store, window, cfg, None)
    assert layout.action_valid().tolist() == [True] * 7 + [False] * 7
    assert layout.state_valid().tolist() == [True] * 8 + [False] * 8
    torch.manual_seed(0)
    model, _ = build_model(cfg, layout)
    objective = TrainingObjective(
        model,
        build_text(cfg, layout, int(model.config["text_dim"])),
        build_codec(cfg),
        NoiseSamplerConfig(p_clean_action=0.0),
        layout.action_valid(),
        layout.state_valid(),
        None,
    )
    data = WindowDataset(store, window, normalization="release")
    batch = collate_windows([data[i] for i in range(3)])
    assert batch["actions"].shape[-1] == 7 and batch["states"].shape[-1] == 8

    def losses(action_slots: slice, state_slots: slice) -> tuple[torch.Tensor, torch.Tensor]:
        def shift(module, args, out):
            out.actions[..., action_slots] += 100.0
            out.states[..., state_slots] += 100.0
            return out

        hook = model.register_forward_hook(shift)
        try:
            with torch.no_grad():
                out = objective(batch, seed=0, step=0, first_index=0, train=False)
        finally:
            hook.remove()
        return out["action"], out["state"]

    base = losses(slice(0, 0), slice(0, 0))
    assert (base[0] > 0).all() and (base[1] > 0).all()
    padded = losses(slice(7, None), slice(8, None))  # the empty right arm: no effect on either loss
    torch.testing.assert_close(padded[0], base[0], rtol=0, atol=0)
    torch.testing.assert_close(padded[1], base[1], rtol=0, atol=0)
    real = losses(slice(6, 7), slice(7, 8))  # the left gripper: both losses change
    assert (real[0] > base[0] + 100).all() and (real[1] > base[1] + 100).all()
