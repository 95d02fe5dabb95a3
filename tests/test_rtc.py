"""Real-time chunking in the flow sampler (xwam_core.schedule.rtc): the soft prefix weights, the frozen
prefix, no effect without weights, a smaller jump at the chunk boundary than naive switching, the action
stream only; and the Policy's prev_chunk / inference_delay keywords in dataset units."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from xwam_core.models.transformer import XWAMTransformer
from xwam_core.schedule.inference import (
    DenoisingSchedule,
    InferenceScheduleConfig,
    initial_latents,
    model_denoiser,
)
from xwam_core.schedule.rtc import RTCGuidance, guidance_weight, prefix_weights

# a tiny random X-WAM: 2 views, 3 latent frames of 4x4, 16 actions, 3 states, 2 blocks
CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    text_dim=8,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    num_views=2,
    action_dim=4,
    state_dim=3,
    num_actions=16,
    num_states=3,
    num_depth_blocks=1,
)
B, K, DA = 2, 16, 4


@pytest.fixture(scope="module")
def model() -> XWAMTransformer:
    torch.manual_seed(0)
    return XWAMTransformer(**CONFIG).eval()


def sample(model, seed: int, mode: str = "policy", rtc: RTCGuidance | None = None, steps: int = 4):
    """One query of the tiny model from the noise of `seed` (the same condition every time)."""
    g = torch.Generator().manual_seed(100)
    context = torch.randn(B, 2, 4, 1, 4, 4, generator=g)
    state = torch.randn(B, 3, generator=g)
    text = torch.randn(B, 5, 8, generator=g)
    video, actions, states = initial_latents(
        context, state, 3, K, DA, 3, generator=torch.Generator().manual_seed(seed)
    )
    config = InferenceScheduleConfig(num_steps_video=steps + 2, num_steps_action=steps)
    schedule = DenoisingSchedule(config)
    return schedule(model_denoiser(model, text), video, actions, states, mode=mode, rtc=rtc)


def test_prefix_weights_follow_the_paper():
    w = prefix_weights(16, 3, 10)
    assert w[:3].tolist() == [1.0, 1.0, 1.0] and w[10:].abs().sum() == 0
    c = (10 - np.arange(3, 10)) / (10 - 3 + 1)
    np.testing.assert_allclose(w[3:10].numpy(), c * np.expm1(c) / math.expm1(1), rtol=1e-6)
    assert all(w[i] > w[i + 1] for i in range(2, 9)) and 0 < w[9] < 1  # strictly decaying over the overlap
    assert prefix_weights(16, 3, 10, overlap="none").tolist() == [1.0] * 3 + [0.0] * 13
    assert prefix_weights(16, 0, 0).abs().sum() == 0
    with pytest.raises(ValueError, match="inference delay"):
        prefix_weights(16, 5, 4)  # more frozen actions than the previous chunk has left
    with pytest.raises(ValueError, match="overlap 'linear'"):
        prefix_weights(16, 1, 4, overlap="linear")
    # beta at both ends, the paper's (1 - tau) / (tau r_tau^2) in between (tau = 1 - sigma)
    assert guidance_weight(1.0, 5.0) == guidance_weight(0.0, 5.0) == 5.0
    tau = 0.7
    r2 = (1 - tau) ** 2 / (tau**2 + (1 - tau) ** 2)
    assert guidance_weight(1 - tau, 5.0) == pytest.approx((1 - tau) / (tau * r2))
    assert guidance_weight(0.5, 100.0) == pytest.approx(2.0)


def test_frozen_prefix_is_the_previous_chunk_exactly(model):
    prev = sample(model, seed=1).actions[:, 6:]  # the old chunk's remaining 10 actions (s = 6)
    for d in (0, 1, 4):
        new = sample(model, seed=2, rtc=RTCGuidance(prev, inference_delay=d)).actions
        assert torch.equal(new[:, :d], prev[:, :d])
    # world mode: frozen before the video's last steps, which are conditioned on the frozen actions
    world = sample(model, seed=2, mode="world", rtc=RTCGuidance(prev, inference_delay=3))
    assert torch.equal(world.actions[:, :3], prev[:, :3]) and world.video is not None


def test_zero_delay_and_zero_weights_sample_as_plain(model):
    plain = sample(model, seed=3)
    prev = sample(model, seed=4).actions[:, 8:]
    for guidance in (
        RTCGuidance(prev, inference_delay=0, overlap="none"),  # the overlap weights are all zero
        RTCGuidance(prev[:, :0], inference_delay=0),  # nothing left of the previous chunk
    ):
        guided = sample(model, seed=3, rtc=guidance)
        assert torch.equal(guided.actions, plain.actions)
        assert torch.equal(guided.states, plain.states)
        assert guided.num_denoiser_calls == plain.num_denoiser_calls


def test_guidance_shrinks_the_jump_at_the_chunk_boundary(model):
    """Executing prev[:d] then new[d:]: the jump new[d] - prev[d] (what the old chunk would have done at
    that step) and the distance over the overlap are smaller with RTC than with naive switching."""
    d, s = 3, 6
    jumps, overlaps = {"naive": [], "rtc": []}, {"naive": [], "rtc": []}
    for seed in range(4):
        prev = sample(model, seed=10 + seed).actions[:, s:]  # (B, K - s, Da)
        naive = sample(model, seed=20 + seed).actions
        rtc = sample(model, seed=20 + seed, rtc=RTCGuidance(prev, inference_delay=d)).actions
        for name, new in (("naive", naive), ("rtc", rtc)):
            jumps[name].append((new[:, d] - prev[:, d]).norm(dim=-1).mean().item())
            overlaps[name].append((new[:, d : K - s] - prev[:, d:]).norm(dim=-1).mean().item())
    assert np.mean(jumps["rtc"]) < 0.5 * np.mean(jumps["naive"])
    assert np.mean(overlaps["rtc"]) < np.mean(overlaps["naive"])


def test_only_the_action_stream_is_guided(model):
    """The video and states take the same forward passes' velocities: with a frozen prefix equal to what
    plain sampling produces anyway the video differs only through the action input it conditions on."""
    prev = sample(model, seed=5).actions[:, 4:]
    guided = sample(model, seed=6, mode="world", rtc=RTCGuidance(prev, inference_delay=2))
    plain = sample(model, seed=6, mode="world")
    assert not torch.equal(guided.actions, plain.actions)
    assert guided.num_denoiser_calls == plain.num_denoiser_calls  # one pass per step (+ its VJP)
    assert torch.equal(guided.states[:, 0], plain.states[:, 0])  # the condition is untouched


def test_bad_guidance_is_refused(model):
    prev = torch.zeros(B, 20, DA)
    with pytest.raises(ValueError, match="does not fit"):
        sample(model, seed=0, rtc=RTCGuidance(prev, inference_delay=1))  # 20 > the chunk's 16
    with pytest.raises(ValueError, match="inference delay"):
        sample(model, seed=0, rtc=RTCGuidance(prev[:, :4], inference_delay=6))


# ---------------------------------------------------------------------------------- the Policy's keywords
@pytest.fixture(scope="module")
def policy_and_obs(tmp_path_factory):
    from tests.run_fixtures import tiny_checkpoint
    from xwam_core.data.reader import EpisodeStore
    from xwam_core.data.windows import WindowDataset
    from xwam_core.policy import Policy

    store_path, ckpt = tiny_checkpoint(tmp_path_factory)
    policy = Policy.from_checkpoint(ckpt)
    store = EpisodeStore(store_path)
    window = WindowDataset(store, policy.spec.window, episodes=[2], normalize=False)[0]
    obs = {
        "images": {v: window["rgb"][j, 0] for j, v in enumerate(policy.spec.views)},
        "state": window["states"][0],
        "task": store.episodes[2].task,
    }
    return policy, obs


def test_policy_prev_chunk_in_dataset_units(policy_and_obs, monkeypatch):
    """prev_chunk is in dataset units: the sampler gets it normalized (and it maps back), the delayed
    prefix comes back exactly, and d = 0 with no overlap weights is plain sampling."""
    policy, obs = policy_and_obs
    policy.reset(seed=1)
    old = policy.predict_chunk(obs)  # (8, 4) dataset units
    prev = old[3:] * 1.5 + 0.25  # somewhere else, still dataset units
    seen = []
    call = type(policy.schedule).__call__

    def recording(self, *args, **kwargs):
        seen.append(kwargs.get("rtc"))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(type(policy.schedule), "__call__", recording)
    policy.reset(seed=2)
    new = policy.predict_chunk(obs, prev_chunk=prev, inference_delay=2)
    assert new.shape == old.shape and new.dtype == np.float32
    np.testing.assert_array_equal(new[:2], prev[:2])  # exactly, in dataset units
    guidance = seen[-1]
    assert guidance.inference_delay == 2 and guidance.prev_actions.shape == (1, 5, 4)
    np.testing.assert_allclose(
        policy.normalizer.action.denormalize(guidance.prev_actions[0].numpy()), prev, rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        guidance.prev_actions[0].numpy(), policy.normalizer.action.normalize(prev), rtol=1e-6
    )
    policy.reset(seed=2)
    plain = policy.predict_chunk(obs)
    policy.reset(seed=2)
    unguided = policy.predict_chunk(obs, prev_chunk=prev, inference_delay=0, overlap="none")
    np.testing.assert_array_equal(unguided, plain)
    assert seen[-1] is not None and seen[-2] is None  # the guided path ran, with zero weights


def test_policy_refuses_bad_real_time_chunking_arguments(policy_and_obs):
    from xwam_core.errors import XWAMError

    policy, obs = policy_and_obs
    prev = np.zeros((5, 4), np.float32)
    cases = [
        (dict(inference_delay=2), "needs prev_chunk"),
        (dict(prev_chunk=np.zeros((5, 3), np.float32)), r"expected \(L, 4\)"),
        (dict(prev_chunk=np.zeros((9, 4), np.float32)), "L <= the chunk's 8"),
        (dict(prev_chunk=prev, inference_delay=6), "expected 0 to the 5 actions"),
        (dict(prev_chunk=prev, inference_delay=-1), "inference_delay -1"),
        (dict(prev_chunk=prev, inference_delay=1.5), "an integer number of control steps"),
        (dict(prev_chunk=prev, overlap="linear"), "overlap 'linear'"),
        (dict(prev_chunk=np.full((5, 4), np.nan, np.float32)), "NaN"),
    ]
    for kwargs, message in cases:
        with pytest.raises(XWAMError, match=message):
            policy.predict_chunk(obs, **kwargs)
