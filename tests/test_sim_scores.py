"""The closed-loop table's statistics (xwam_core.sim.scores): Wilson intervals against known values and the
goal-following correlation on synthetic displacements."""

from __future__ import annotations

import numpy as np
import pytest

from xwam_core.sim.scores import goal_following, pearson, wilson_interval


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [  # statsmodels.stats.proportion.proportion_confint(k, n, method="wilson")
        (0, 5, 0.0, 0.434482),
        (5, 5, 0.565518, 1.0),
        (1, 10, 0.017876, 0.404150),
        (4, 10, 0.168180, 0.687326),
        (10, 20, 0.299298, 0.700702),
    ],
)
def test_wilson_interval_known_values(k, n, low, high):
    assert wilson_interval(k, n) == pytest.approx((low, high), abs=1e-6)


def test_wilson_interval_refuses_nonsense():
    for k, n in ((1, 0), (-1, 5), (6, 5)):
        with pytest.raises(ValueError):
            wilson_interval(k, n)


def test_goal_following_perfect_shuffled_and_too_few():
    rng = np.random.default_rng(0)
    expert = rng.normal(0, 5, (200, 3))
    perfect = goal_following(0.5 * expert + 1.0, expert)  # same direction, smaller and offset: r = 1
    assert perfect["starts"] == 200
    assert all(v == pytest.approx(1.0) for v in perfect["r"].values())
    assert perfect["r_mean"] == pytest.approx(1.0)
    assert perfect["std"]["x"] == pytest.approx(0.5 * perfect["expert_std"]["x"])
    shuffled = goal_following(expert[rng.permutation(200)], expert)
    assert abs(shuffled["r_mean"]) < 0.15
    same_move = goal_following(np.tile([1.0, 2.0, 3.0], (200, 1)), expert)  # ignores the goal
    assert same_move["r_mean"] is None and same_move["std"] == {"x": 0.0, "y": 0.0, "z": 0.0}
    few = goal_following(expert[:2], expert[:2])
    assert few["r"] == {"x": None, "y": None, "z": None} and few["r_mean"] is None
    assert pearson(np.arange(3.0), -np.arange(3.0)) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        goal_following(expert[:, :2], expert[:, :2])
