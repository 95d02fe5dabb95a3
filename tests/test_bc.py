"""The behaviour-cloning baseline (xwam_core.sim.bc): it learns, it fits what is learnable, it is
reproducible, and it never reads the held-out episodes. Its run in the closed loop: tests/test_sim_eval.py."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest

from tests.conftest import RecordingProgress, synthetic_episode, write_store
from xwam_core.data.episode import Episode
from xwam_core.data.reader import EpisodeStore
from xwam_core.data.sources.base import EpisodeSource, SourceInfo
from xwam_core.errors import XWAMError
from xwam_core.sim.bc import BCConfig, chunk_samples, train_bc, training_episodes

W = np.random.default_rng(3).normal(0, 0.4, (4, 8)).astype(np.float32)


def f(state: np.ndarray) -> np.ndarray:
    """The learnable mapping: action = tanh(W state)."""
    return np.tanh(state @ W.T).astype(np.float32)


class MappedSource(EpisodeSource):
    """Episodes whose action is f(state) (states uniform in [-1, 1]); the last `flipped` episodes act -f(state),
    so a policy that read them could not fit f."""

    def __init__(self, episodes: int = 6, length: int = 60, flipped: int = 2):
        self.n, self.length, self.flipped = episodes, length, flipped

    def info(self) -> SourceInfo:
        return SourceInfo(
            name="mapped",
            robot_type="test",
            fps=20.0,
            views=["a"],
            image_size=(8, 8),
            state_names=[f"s{i}" for i in range(8)],
            action_names=[f"a{i}" for i in range(4)],
            num_episodes=self.n,
            has_depth=False,
            has_cameras=False,
        )

    def episodes(self) -> Iterator[Episode]:
        rng = np.random.default_rng(0)
        for i in range(self.n):
            ep = synthetic_episode(rng, self.length, (8, 8), ["a"], "reach", cameras=False, depth=False)
            state = rng.uniform(-1, 1, (self.length, 8)).astype(np.float32)
            sign = -1.0 if i >= self.n - self.flipped else 1.0
            yield dataclasses.replace(ep, state=state, action=sign * f(state))


@pytest.fixture(scope="module")
def mapped_store(tmp_path_factory) -> EpisodeStore:
    path = tmp_path_factory.mktemp("bc") / "store"
    write_store(path, MappedSource())
    return EpisodeStore(path)


FAST = BCConfig(hidden=64, layers=2, steps=600, batch_size=64, lr=3e-3)


def test_chunks_are_padded_past_the_episode_end_and_masked():
    state = np.arange(5, dtype=np.float32)[:, None]
    action = 10 + np.arange(5, dtype=np.float32)[:, None]
    s, a, mask = chunk_samples(state, action, starts=[0, 3], lengths=[3, 2], chunk=3)
    assert s[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert a[..., 0].tolist() == [[10, 11, 12], [11, 12, 12], [12, 12, 12], [13, 14, 14], [14, 14, 14]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 0], [1, 0, 0]]


def test_bc_learns_the_mapping_and_never_sees_held_out_episodes(mapped_store):
    train = training_episodes(mapped_store, 2)
    assert train == [0, 1, 2, 3]  # one task: the last two (the flipped ones) are held out
    progress = RecordingProgress()
    bc = train_bc(mapped_store, train, chunk=1, config=FAST, progress=progress)
    info = bc.info
    assert info["episodes"] == train and info["frames"] == 4 * 60
    assert info["loss_final"] < 0.1 * info["loss_first"]  # it learns
    assert progress.tasks["behaviour cloning (state MLP)"]["done"] == FAST.steps
    assert info["train_seconds"] > 0
    rng = np.random.default_rng(9)
    states = rng.uniform(-1, 1, (50, 8)).astype(np.float32)
    pred = np.stack([bc.predict_chunk({"state": s, "task": "reach"})[0] for s in states])
    err = np.abs(pred - f(states)).mean()
    assert err < 0.1, err  # fits f on fresh states: had it read the flipped episodes, it could not
    assert np.abs(pred + f(states)).mean() > 5 * err


def test_bc_is_reproducible_and_acts_like_the_policy(mapped_store):
    a = train_bc(
        mapped_store, [0, 1], chunk=4, actions_per_query=2, config=dataclasses.replace(FAST, steps=50)
    )
    b = train_bc(
        mapped_store, [0, 1], chunk=4, actions_per_query=2, config=dataclasses.replace(FAST, steps=50)
    )
    obs = {"state": np.zeros(8, np.float32), "task": "reach", "images": {}}
    np.testing.assert_array_equal(a.predict_chunk(obs), b.predict_chunk(obs))
    assert a.predict_chunk(obs).shape == (4, 4)
    a.reset(seed=1)
    assert a.wants_observation
    first = a.select_action(obs)
    assert not a.wants_observation  # 2 actions per query: one queued
    a.select_action(obs)
    assert a.wants_observation and len(a.query_latencies_s) == 1
    np.testing.assert_allclose(first, a.predict_chunk(obs)[0])
    with pytest.raises(XWAMError, match="actions per query 5"):
        train_bc(mapped_store, [0], chunk=4, actions_per_query=5, config=dataclasses.replace(FAST, steps=1))
    with pytest.raises(XWAMError, match="not in the store"):
        train_bc(mapped_store, [0, 17], chunk=4, config=FAST)
    with pytest.raises(XWAMError, match="task 'push'"):
        a.predict_chunk({"state": np.zeros(8), "task": "push"})
