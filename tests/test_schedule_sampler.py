"""ANS training sampler: ordering, clean fraction and marginals over 100,000 draws (docs/method.md, 4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from xwam_core.errors import RecipeError
from xwam_core.schedule.flow import add_noise, shift_timesteps, velocity_target
from xwam_core.schedule.sampler import NoiseSamplerConfig, sample_noise_levels

N = 100_000
P_MIN = 1e-3  # a correct formula passes KS at this level; the controls fail far below it


def draw(**overrides) -> tuple[NoiseSamplerConfig, dict[str, np.ndarray]]:
    config = NoiseSamplerConfig(**overrides)
    sample = sample_noise_levels(config, N, generator=torch.Generator().manual_seed(1234))
    arrays = {k: getattr(sample, k).double().numpy() for k in ("t_video", "t_action")}
    arrays["action_loss_on"] = sample.action_loss_on.numpy()
    arrays["drop_text"] = sample.drop_text.numpy()
    return config, arrays


def shifted_uniform_cdf(shift: float):
    """CDF of shift(U): P(shift(U) <= x) = unshift(x)."""
    return lambda x: np.clip(x / (shift - (shift - 1.0) * x), 0.0, 1.0)


def lagged_video_cdf(config: NoiseSamplerConfig):
    """CDF of shift(t_a + (1 - t_a) b), t_a ~ U, b ~ Beta(a, b), tabulated from its integral.

    1 - t = U W with U ~ U(0,1), W = 1 - b ~ Beta(lag_b, lag_a), so
    P(U W <= y) = F_W(y) + y * int_y^1 f_W(w) / w dw, the integral taken in u = log w (smooth there).
    """
    w = stats.beta(config.lag_beta_b, config.lag_beta_a)
    u = np.linspace(np.log(1e-12), 0.0, 400_001)
    f = w.pdf(np.exp(u))
    tail = integrate.cumulative_trapezoid(f[::-1], -u[::-1], initial=0.0)[::-1]  # int_u^0 f(e^s) ds
    y = np.exp(u)
    g = w.cdf(y) + y * tail

    def cdf(x):
        x = np.clip(x, 0.0, 1.0)
        raw = x / (config.shift - (config.shift - 1.0) * x)
        return 1.0 - np.interp(1.0 - raw, y, g, left=0.0, right=1.0)

    return cdf


def test_ans_orders_streams_and_cleans_half_the_actions():
    config, t = draw()
    assert (t["t_video"] >= t["t_action"]).all()
    assert ((t["t_video"] >= 0) & (t["t_video"] <= 1) & (t["t_action"] >= 0) & (t["t_action"] <= 1)).all()
    clean = t["t_action"] == 0
    assert abs(clean.mean() - config.p_clean_action) < 0.01
    assert (t["action_loss_on"] == ~clean).all()
    assert abs(t["drop_text"].mean() - config.p_drop_text) < 0.01


def test_ans_marginals_match_the_formulas():
    config, t = draw()
    clean = t["t_action"] == 0
    uniform = shifted_uniform_cdf(config.shift)
    lagged = lagged_video_cdf(config)
    p = config.p_clean_action
    assert stats.kstest(t["t_action"][~clean], uniform).pvalue > P_MIN
    assert stats.kstest(t["t_video"][clean], uniform).pvalue > P_MIN
    assert stats.kstest(t["t_video"][~clean], lagged).pvalue > P_MIN
    assert stats.kstest(t["t_video"], lambda x: p * uniform(x) + (1 - p) * lagged(x)).pvalue > P_MIN
    # Controls: the test has the power to see a missing shift or a swapped Beta.
    assert stats.kstest(t["t_action"][~clean], shifted_uniform_cdf(1.0)).pvalue < 1e-6
    swapped = NoiseSamplerConfig(lag_beta_a=config.lag_beta_b, lag_beta_b=config.lag_beta_a)
    assert stats.kstest(t["t_video"][~clean], lagged_video_cdf(swapped)).pvalue < 1e-6


@pytest.mark.parametrize("p_clean", [0.0, 0.2, 1.0])
def test_ans_clean_fraction_follows_the_recipe(p_clean):
    _, t = draw(p_clean_action=p_clean, lag_beta_a=2.0, lag_beta_b=0.7, shift=3.0)
    assert (t["t_video"] >= t["t_action"]).all()
    assert abs((t["t_action"] == 0).mean() - p_clean) < 0.01


def test_ans_lag_with_other_beta_and_shift():
    config, t = draw(p_clean_action=0.0, lag_beta_a=2.0, lag_beta_b=0.7, shift=3.0)
    assert stats.kstest(t["t_video"], lagged_video_cdf(config)).pvalue > P_MIN
    assert stats.kstest(t["t_action"], shifted_uniform_cdf(3.0)).pvalue > P_MIN


def test_sync_shares_one_timestep():
    config, t = draw(mode="sync")
    assert (t["t_video"] == t["t_action"]).all()
    assert stats.kstest(t["t_video"], shifted_uniform_cdf(config.shift)).pvalue > P_MIN
    assert t["action_loss_on"].mean() > 0.999


def test_decoupled_draws_independent_timesteps():
    config, t = draw(mode="decoupled")
    uniform = shifted_uniform_cdf(config.shift)
    assert stats.kstest(t["t_video"], uniform).pvalue > P_MIN
    assert stats.kstest(t["t_action"], uniform).pvalue > P_MIN
    # Independence: t_video < t_action about half the time, and no correlation.
    assert abs((t["t_video"] < t["t_action"]).mean() - 0.5) < 0.01
    assert abs(np.corrcoef(t["t_video"], t["t_action"])[0, 1]) < 0.02


def test_sampler_is_reproducible_from_generator_state():
    config = NoiseSamplerConfig()
    a = sample_noise_levels(config, 64, generator=torch.Generator().manual_seed(7))
    b = sample_noise_levels(config, 64, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.t_video, b.t_video) and torch.equal(a.t_action, b.t_action)
    assert torch.equal(a.drop_text, b.drop_text)


def test_shift_round_trips_and_keeps_ends():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    shifted = shift_timesteps(t, 5.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted[1:] > shifted[:-1]).all()
    torch.testing.assert_close(shifted / (5.0 - 4.0 * shifted), t)  # the inverse t = t' / (s - (s - 1) t')


def test_flow_interpolation_and_target():
    x0, eps = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    t = torch.tensor([0.0, 0.3, 1.0])
    x_t = add_noise(x0, eps, t)
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[2], eps[2])
    # Integrating the target velocity from t back to 0 lands on x0.
    torch.testing.assert_close(x_t - t[:, None, None] * velocity_target(x0, eps), x0)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"mode": "joint"}, "mode"),
        ({"p_clean_action": 1.5}, "p_clean_action"),
        ({"p_clean_action": -0.1}, "p_clean_action"),
        ({"p_drop_text": 2.0}, "p_drop_text"),
        ({"lag_beta_a": 0.0}, "lag_beta_a"),
        ({"lag_beta_b": -1.0}, "lag_beta_b"),
        ({"shift": 0.0}, "shift"),
        ({"shift": float("inf")}, "shift"),
    ],
)
def test_sampler_config_errors_name_the_field(overrides, field):
    config = NoiseSamplerConfig(**overrides)
    with pytest.raises(RecipeError, match=rf"^noise\.{field}: expected") as error:
        config.validate()
    assert "\n" not in str(error.value)


def test_default_sampler_config_is_valid():
    NoiseSamplerConfig().validate()
    for mode in ("sync", "decoupled"):
        NoiseSamplerConfig(mode=mode).validate()
