"""train.action_lr_scale: the action/state modules in an AdamW group of their own, at a multiple of the rate."""

from __future__ import annotations

import pytest
import torch

from xwam_core.errors import XWAMError
from xwam_core.models.presets import build_model
from xwam_core.models.transformer import ACTION_MODULES
from xwam_core.train import lr_lambda, optimizer_groups

SMALL = dict(num_layers=2, num_depth_blocks=1, in_channels=48, out_channels=48, num_views=2, action_dim=4,
             state_dim=8, num_actions=8, num_states=3)  # fmt: skip


def test_scale_one_keeps_one_group_of_every_trainable_parameter():
    model = build_model("tiny", **SMALL)
    groups = optimizer_groups(model, 1e-3, 1.0)
    assert len(groups) == 1
    assert [id(p) for p in groups[0]["params"]] == [id(p) for p in model.parameters()]


def test_the_action_and_state_modules_get_the_scaled_rate_through_the_schedule():
    model = build_model("tiny", **SMALL, state_broadcast=True, state_modulation=True)
    model.view_embedding.requires_grad_(False)  # frozen parameters are left out of both groups
    groups = optimizer_groups(model, 1e-3, 4.0)
    rest, action = groups
    expected = {
        id(p)
        for name in ACTION_MODULES
        if (m := getattr(model, name, None)) is not None
        for p in m.parameters()
    }
    assert {id(p) for p in action["params"]} == expected and action["lr"] == pytest.approx(4e-3)
    assert {id(p) for p in rest["params"]}.isdisjoint(expected)
    assert len(rest["params"]) + len(action["params"]) == sum(p.requires_grad for p in model.parameters())
    assert id(model.view_embedding) not in {id(p) for g in groups for p in g["params"]}

    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(10, 100, 0.0))
    for _ in range(30):
        optimizer.step()
        schedule.step()
    base, scaled = (g["lr"] for g in optimizer.param_groups)
    assert 0 < base < 1e-3 and scaled == pytest.approx(4 * base)  # the ratio holds while the rate decays


def test_a_model_without_action_modules_is_refused():
    with pytest.raises(XWAMError, match=r"train\.action_lr_scale"):
        optimizer_groups(torch.nn.Linear(3, 3), 1e-3, 2.0)
