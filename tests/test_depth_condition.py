"""depth_condition: the depth branch reads the observed current depth (RGB-D input) and is gated against it;
the main branch (video, actions, states) never sees it."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import SyntheticSource, write_store
from tests.run_fixtures import train_tiny
from xwam_core.data.reader import EpisodeStore
from xwam_core.data.windows import WindowDataset, collate_windows
from xwam_core.errors import XWAMError
from xwam_core.models.presets import build_model
from xwam_core.policy import Policy

KW = dict(
    num_layers=2, num_depth_blocks=1, in_channels=48, out_channels=48, num_views=2,
    action_dim=4, state_dim=8, num_actions=8, num_states=3,
)  # fmt: skip


def inputs():
    torch.manual_seed(1)
    video = torch.randn(2, 2, 48, 3, 4, 4)
    return (
        video,
        torch.randn(2, 8, 4),
        torch.randn(2, 3, 8),
        torch.tensor([700.0, 300.0]),
        torch.tensor([300.0, 10.0]),
    )


def test_observed_depth_reaches_only_the_depth_branch():
    torch.manual_seed(0)
    plain = build_model("tiny", **KW).eval()
    rgbd = build_model("tiny", **KW, depth_condition=True).eval()
    missing, _ = rgbd.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing) == sorted(
        ["depth_conditioner.embedding.weight", "depth_conditioner.embedding.bias", "depth_conditioner.gate.weight", "depth_conditioner.gate.bias"]
    )  # fmt: skip
    video, actions, states, t_video, t_action = inputs()
    text = torch.randn(2, 4, plain.config.text_dim)
    observed = torch.randn(2, 2, 48, 1, 4, 4)
    with torch.no_grad():
        ref = plain(video, actions, states, t_video, t_action, text)
        out = rgbd(video, actions, states, t_video, t_action, text, depth_context=observed)
        other = rgbd(video, actions, states, t_video, t_action, text, depth_context=observed + 1.0)
    for name in ("video", "actions", "states"):  # unilateral: the main branch is unchanged
        torch.testing.assert_close(getattr(out, name), getattr(ref, name))
        torch.testing.assert_close(getattr(other, name), getattr(ref, name))
    g = torch.sigmoid(torch.tensor(-4.0))  # a new model: closed gates, ~the observed depth in every frame
    torch.testing.assert_close(out.depth, observed + g * (ref.depth - observed), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        rgbd.depth_conditioner.embedding.weight.normal_()  # once trained, the branch reads the observed depth
        a = rgbd(video, actions, states, t_video, t_action, text, depth_context=observed)
        b = rgbd(video, actions, states, t_video, t_action, text, depth_context=observed + 1.0)
    assert (a.depth - b.depth).abs().mean() > 1e-3
    with pytest.raises(XWAMError, match="pass depth_context"):
        rgbd(video, actions, states, t_video, t_action, text)
    with pytest.raises(XWAMError, match=r"depth_context must be \(B, V, C, 1, h, w\)"):
        rgbd(video, actions, states, t_video, t_action, text, depth_context=observed[:, :1])
    with torch.no_grad():  # the policy path (no depth branch) needs no depth
        rgbd(video, actions, states, t_video, t_action, text, run_depth=False)
    shut = build_model("tiny", **KW, depth_condition=True, video_prediction="gated", gate_init_logit=-8.0)
    assert shut.depth_conditioner is not None
    assert (shut.video_head.gate.bias == -8.0).all() and (shut.depth_conditioner.gate.bias == -8.0).all()


@pytest.fixture(scope="module")
def rgbd_checkpoint(tmp_path_factory):
    base = tmp_path_factory.mktemp("rgbd")
    store = base / "store"
    write_store(store, SyntheticSource(episodes=3, length=14, size=(32, 32), views=("a", "b")))
    return store, train_tiny(store, base / "run", model="depth_condition = true")


def test_world_mode_reads_the_observed_depth(rgbd_checkpoint):
    store_path, ckpt = rgbd_checkpoint
    policy = Policy.from_checkpoint(ckpt)
    assert policy.depth_condition
    store = EpisodeStore(store_path)
    data = WindowDataset(store, policy.spec.window, episodes=[2], normalize=False)
    raw = collate_windows([data[0], data[1]])
    views = policy.spec.views
    obs = {
        "images": {v: raw["rgb"][:, j, 0].numpy() for j, v in enumerate(views)},
        "state": raw["states"][:, 0].numpy(),
        "task": [store.tasks[int(t)] for t in raw["task_index"]],
        "depth": {v: raw["depth"][:, j, 0].numpy() for j, v in enumerate(views)},
    }
    with torch.no_grad():  # shut gates: the predicted future depth is the observed depth, in metres
        policy.model.depth_conditioner.gate.bias.fill_(-30.0)
    out = policy.predict(obs, mode="world", generator=torch.Generator().manual_seed(0))
    observed = raw["depth"][:, :, :1].float()
    lo, hi = policy.depth_range.near, policy.depth_range.far
    expected = observed.clamp(lo, hi).expand(out.depth.shape).numpy()
    assert (abs(out.depth - expected) / expected).max() < 0.005
    del obs["depth"]
    policy.predict(obs, mode="policy")  # actions need no depth
    with pytest.raises(XWAMError, match=r"world mode needs observation 'depth'"):
        policy.predict(obs, mode="world")


def test_world_mode_on_a_store_without_depth_is_refused_up_front(rgbd_checkpoint, tmp_path):
    from xwam_core.infer_run import InferOptions, infer_run

    _, ckpt = rgbd_checkpoint
    flat = tmp_path / "rgb_only"
    write_store(flat, SyntheticSource(episodes=3, length=14, size=(32, 32), views=("a", "b"), depth=False))
    out = tmp_path / "run"
    with pytest.raises(XWAMError, match=r"has no depth, and .* reads the observed depth"):
        infer_run(InferOptions(ckpt, flat, out, mode="world"))
    assert not out.exists()
    policy = infer_run(InferOptions(ckpt, flat, out, mode="policy", windows_per_episode=1, videos=False))
    assert out.exists() and policy is not None
