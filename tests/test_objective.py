"""The training objective's video loss: flow matching on the velocity, or the same error on the clean latent,
as the model's video head declares."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tests.conftest import SyntheticSource, write_store
from xwam_core.data.reader import EpisodeStore
from xwam_core.data.windows import WindowDataset, WindowLayout, collate_windows
from xwam_core.errors import XWAMError
from xwam_core.factory import build_codec, build_model, build_text, layout_for
from xwam_core.models.heads import MIN_SAMPLE_T, VelocityHead
from xwam_core.objective import TrainingObjective, sample_generator
from xwam_core.recipe import ModelConfig, load_recipe
from xwam_core.schedule.sampler import NoiseSamplerConfig, sample_noise_levels

TINY_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny_cpu.toml"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("objective") / "store"
    write_store(path, SyntheticSource(episodes=2, length=12, size=(32, 32), views=("a", "b")))
    return EpisodeStore(path)


@pytest.fixture(scope="module")
def setup(store):
    window = WindowLayout(4, 2)
    cfg = ModelConfig(
        preset="tiny",
        depth_ranges={"b": [0.1, 4.0]},
        overrides={"num_layers": 2, "num_depth_blocks": 1},
    )
    layout = layout_for(store, window, cfg, None)
    torch.manual_seed(0)
    model, _ = build_model(cfg, layout)
    text = build_text(cfg, layout, int(model.config["text_dim"]))
    data = WindowDataset(store, window, episodes=[0, 1])
    batch = collate_windows([data[i] for i in range(4)])
    return model, text, build_codec(cfg), layout, batch


def objective(setup, model=None, action_step_weights=None) -> TrainingObjective:
    default_model, text, codec, layout, _ = setup
    return TrainingObjective(
        model or default_model,
        text,
        codec,
        NoiseSamplerConfig(),
        layout.action_valid(),
        layout.state_valid(),
        None,
        action_step_weights,
    )


class VelocityHeadWithSampleLoss(VelocityHead):
    """Wan's output unchanged, but declaring the "sample" loss form: isolates what the declaration does."""

    loss_form = "sample"


def test_the_video_loss_takes_the_heads_form(setup):
    velocity_model = copy.deepcopy(setup[0])
    velocity_model.video_head = VelocityHead()
    sample_model = copy.deepcopy(setup[0])
    sample_model.video_head = VelocityHeadWithSampleLoss()
    assert setup[0].video_head.loss_form == "sample"  # the tiny preset's gated head
    assert objective(setup).video_loss == "sample"
    batch = setup[-1]
    with torch.no_grad():  # same outputs; only the declared loss form differs
        velocity = objective(setup, velocity_model)(batch, seed=3, step=5, first_index=0, train=False)
        sample = objective(setup, sample_model)(batch, seed=3, step=5, first_index=0, train=False)
    # the timesteps the objective drew: each sample's generator, first draw (no augmentation here)
    t = torch.cat(
        [sample_noise_levels(NoiseSamplerConfig(), 1, sample_generator(3, 5, i)).t_video for i in range(4)]
    )
    assert (t > MIN_SAMPLE_T).all() and (t < 1).all()
    # "sample": the velocity error times t^2, i.e. measured on the clean latent
    torch.testing.assert_close(sample["video"], velocity["video"] * t**2)
    for term in ("action", "state", "depth"):  # only the video term changes
        torch.testing.assert_close(sample[term], velocity[term])
    assert setup[0].depth_range.per_view  # the store's views a (default range) and b (its own)


def test_a_recipe_cannot_choose_the_video_loss():
    with pytest.raises(XWAMError, match=r"unknown key 'train\.video_loss'"):
        load_recipe(TINY_RECIPE, ["train.video_loss=velocity"])  # the model's head decides it


def test_loss_masks_follow_the_drawn_timesteps_and_depth(setup):
    """What train.py averages over: action/state losses only where t_action > 0, depth where there is depth."""
    batch = setup[-1]
    with torch.no_grad():
        losses = objective(setup)(batch, seed=0, step=0, first_index=0, train=False)
    t_action = torch.cat(
        [sample_noise_levels(NoiseSamplerConfig(), 1, sample_generator(0, 0, i)).t_action for i in range(4)]
    )
    assert 0 < int((t_action > 0).sum()) < 4  # this draw has both clean and noisy actions
    assert torch.equal(losses["action_mask"], (t_action > 0).float())
    assert torch.equal(losses["state_mask"], losses["action_mask"])
    assert torch.equal(losses["depth_mask"], batch["has_depth"].float())
    assert torch.equal(losses["video_mask"], torch.ones(4))


# ---- padding past an episode's end (action_is_pad / state_is_pad) ------------------------------------
@pytest.fixture(scope="module")
def padded_batch(store):
    """Windows of episode 0 (12 frames; K = 8 actions, 5 states at stride 2) starting at local frames
    3 (full), 7 (4 real actions, 2 real future states), 10 (1 real action, none) and 11 (its last)."""
    data = WindowDataset(store, WindowLayout(4, 2), episodes=[0], pad_episode_ends=True)
    batch = collate_windows([data[i] for i in (3, 7, 10, 11)])
    assert (~batch["action_is_pad"]).sum(1).tolist() == [8, 4, 1, 0]
    assert (~batch["state_is_pad"][:, 1:]).sum(1).tolist() == [4, 2, 0, 0]
    return batch


def losses_with(setup, batch, seed=0, prediction=None, target=None, monkeypatch=None):
    """The objective's losses, with `prediction(out)` editing the model's output and `target(kind, t)`
    editing the flow-matching targets (kind: "action" / "state" by shape) before the losses."""
    model = copy.deepcopy(setup[0])
    if prediction is not None:
        model.register_forward_hook(lambda module, args, out: prediction(out))
    if target is not None:
        assert monkeypatch is not None
        from xwam_core.schedule.flow import velocity_target

        def edited(x0, eps):
            v = velocity_target(x0, eps)
            if v.dim() == 3:
                return target("action" if v.shape[1] == batch["action_is_pad"].shape[1] else "state", v)
            return v

        monkeypatch.setattr("xwam_core.objective.velocity_target", edited)
    torch.manual_seed(0)
    with torch.no_grad():
        return objective(setup, model)(batch, seed=seed, step=0, first_index=0, train=False)


def _on_padded(mask_key, batch):
    def edit(v):
        pad = batch[mask_key].unsqueeze(-1)
        return torch.where(pad, v + 100.0, v)

    return edit


def _on_real_step(mask_key, batch, row, step):
    def edit(v):
        assert not bool(batch[mask_key][row, step])
        v = v.clone()
        v[row, step] += 1.0
        return v

    return edit


def test_padded_steps_carry_no_loss(setup, padded_batch, monkeypatch):
    b = padded_batch
    seed = next(
        s for s in range(50) if all(lv > 0 for lv in _t_action(s, 4))
    )  # every sample's actions noised
    base = losses_with(setup, b, seed)
    assert torch.isfinite(base["action"]).all() and torch.isfinite(base["state"]).all()
    assert base["action_mask"].tolist() == [1, 1, 1, 0] and base["state_mask"].tolist() == [1, 1, 0, 0]
    assert float(base["action"][3]) == 0.0 and float(base["state"][2:].abs().sum()) == 0.0

    def out_edit(fn_a, fn_s):
        def edit(out):
            out.actions = fn_a(out.actions) if fn_a else out.actions
            out.states = fn_s(out.states) if fn_s else out.states
            return out

        return edit

    # padded predictions and padded targets change nothing
    for kwargs in (
        {"prediction": out_edit(_on_padded("action_is_pad", b), _on_padded("state_is_pad", b))},
        {"target": lambda kind, v: _on_padded(f"{kind}_is_pad", b)(v), "monkeypatch": monkeypatch},
    ):
        edited = losses_with(setup, b, seed, **kwargs)
        for term in ("action", "state", "action_mask", "state_mask", "video"):
            assert torch.equal(edited[term], base[term]), (term, kwargs)
        monkeypatch.undo()
    # a real step's prediction or target changes its sample's loss, and only that one
    for edit, term, row in (
        (out_edit(_on_real_step("action_is_pad", b, 1, 3), None), "action", 1),
        (out_edit(None, _on_real_step("state_is_pad", b, 1, 2)), "state", 1),
        (out_edit(_on_real_step("action_is_pad", b, 2, 0), None), "action", 2),
    ):
        edited = losses_with(setup, b, seed, prediction=edit)
        assert float(edited[term][row]) != float(base[term][row])
        others = [i for i in range(4) if i != row]
        assert torch.equal(edited[term][others], base[term][others])
    edited = losses_with(
        setup,
        b,
        seed,
        # action step 0 (frame 7 -> 8); state step 1 (frame 9: step 0 is the current state, no loss)
        target=lambda kind, v: _on_real_step(f"{kind}_is_pad", b, 1, 0 if kind == "action" else 1)(v),
        monkeypatch=monkeypatch,
    )
    assert float(edited["action"][1]) != float(base["action"][1])
    assert float(edited["state"][1]) != float(base["state"][1])


def _t_action(seed, n):
    return [
        float(sample_noise_levels(NoiseSamplerConfig(), 1, sample_generator(seed, 0, i)).t_action)
        for i in range(n)
    ]


def test_the_per_sample_mean_counts_real_steps_only():
    from xwam_core.objective import masked_step_mean

    err = torch.rand(3, 6, 4)
    dims = torch.tensor([1.0, 1.0, 1.0, 0.0])  # the last dimension is padding for this embodiment
    steps = torch.tensor([[1.0] * 6, [1, 1, 0, 0, 0, 0], [0.0] * 6])
    got = masked_step_mean(err, dims, steps)
    torch.testing.assert_close(got[0], err[0, :, :3].mean())
    torch.testing.assert_close(got[1], err[1, :2, :3].mean())
    assert float(got[2]) == 0.0
    # no padded step: bit for bit the old formula sum(err * w) / (sum(w) * K)
    w = dims.view(1, 1, -1)
    assert torch.equal(got[0], ((err * w).sum((1, 2)) / (w.sum() * 6))[0])


def test_a_batch_of_only_padded_steps_gives_zero_without_nan(setup, store):
    from xwam_core.train import _mask_sums, _reduce_losses, _step_logs

    data = WindowDataset(store, WindowLayout(4, 2), episodes=[0, 1], pad_episode_ends=True)
    last = [i for i in range(len(data)) if int(data.windows[i, 2]) == 11]  # each episode's last frame
    batch = collate_windows([data[i] for i in last])
    assert batch["action_is_pad"].all() and batch["state_is_pad"][:, 1:].all()
    model = copy.deepcopy(setup[0])
    obj = objective(setup, model)
    losses = obj(batch, seed=0, step=0, first_index=0, train=True)
    for term in ("action", "state"):
        assert torch.equal(losses[term], torch.zeros(2)) and torch.equal(
            losses[f"{term}_mask"], torch.zeros(2)
        )
    counts = _mask_sums([losses])[0]
    total, sums = _reduce_losses(losses, counts, 1)
    logs = _step_logs(sums, counts)
    assert logs["action"] == 0.0 and logs["state"] == 0.0 and torch.isfinite(total)
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in obj.parameters() if p.grad is not None)


def test_executed_action_weight_weights_the_first_actions_of_the_loss(setup, monkeypatch):
    """train.executed_action_weight: each sample's action loss is the weighted mean over its steps, the
    first inference.actions_per_query weighing `weight` and the rest 1; the state loss is untouched."""
    from xwam_core import objective as module
    from xwam_core.objective import executed_action_weights, masked_step_mean

    assert executed_action_weights(8, 2, 1.0) is None  # the paper's uniform mean
    assert executed_action_weights(8, 0, 4.0) is None and executed_action_weights(8, 8, 4.0) is None
    weights = executed_action_weights(8, 2, 4.0)
    assert weights is not None and weights.tolist() == [4.0, 4.0] + [1.0] * 6
    batch = setup[4]
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def recording(err, dim_w, step_w):
        calls.append((err.clone(), dim_w.clone(), step_w.clone()))
        return masked_step_mean(err, dim_w, step_w)

    monkeypatch.setattr(module, "masked_step_mean", recording)
    results = {}
    for name, step_weights in (("uniform", None), ("weighted", weights)):
        calls.clear()
        torch.manual_seed(0)
        with torch.no_grad():
            results[name] = (
                objective(setup, action_step_weights=step_weights)(
                    batch, seed=3, step=0, first_index=0, train=False
                ),
                list(calls),
            )
    (uniform, uniform_calls), (weighted, weighted_calls) = results["uniform"], results["weighted"]
    (err, dims, real), (err_w, _, step_w) = uniform_calls[0], weighted_calls[0]
    torch.testing.assert_close(err_w, err)  # the same noise, the same errors: only the weighting differs
    torch.testing.assert_close(step_w, real * weights)
    per_step = (err * dims).sum(-1) / dims.sum()  # (B, K)
    torch.testing.assert_close(
        weighted["action"], (per_step * real * weights).sum(1) / (real * weights).sum(1)
    )
    torch.testing.assert_close(uniform["action"], (per_step * real).sum(1) / real.sum(1))
    assert not torch.allclose(weighted["action"], uniform["action"])
    torch.testing.assert_close(weighted["state"], uniform["state"])
