"""train.loss_weights: the weighted sum of the loss terms (the release: all 1)."""

from __future__ import annotations

import pytest
import torch

from xwam_core.errors import RecipeError
from xwam_core.objective import LOSS_TERMS
from xwam_core.recipe import LOSS_WEIGHT_TERMS, TrainConfig, load_recipe
from xwam_core.train import _mask_sums, _reduce_losses, _step_logs


def _losses() -> dict[str, torch.Tensor]:
    values = {"video": [1.0, 3.0], "action": [2.0, 4.0], "state": [0.5, 0.5], "depth": [8.0, 0.0]}
    masks = {"video": [1, 1], "action": [1, 0], "state": [1, 1], "depth": [1, 0]}
    out = {}
    for term in LOSS_TERMS:
        out[term] = torch.tensor(values[term], requires_grad=True)
        out[f"{term}_mask"] = torch.tensor(masks[term], dtype=torch.float32)
    return out


def test_the_recipe_knows_the_objective_terms():
    assert LOSS_WEIGHT_TERMS == LOSS_TERMS
    assert TrainConfig().loss_weights == dict.fromkeys(LOSS_TERMS, 1.0)


def test_weights_scale_each_masked_term_and_missing_terms_weigh_one():
    losses = _losses()
    counts = _mask_sums([losses])[0]
    plain, sums = _reduce_losses(losses, counts, world=1)
    logs = _step_logs(sums, counts)
    # masked means: video 2, action 2, state 0.5, depth 8
    assert logs == {"video": 2.0, "action": 2.0, "state": 0.5, "depth": 8.0, "loss": 12.5}
    assert float(plain.detach()) == pytest.approx(12.5)
    weights = {"action": 3.0, "depth": 0.0}
    weighted, sums = _reduce_losses(losses, counts, world=1, weights=weights)
    logs = _step_logs(sums, counts, weights)
    assert float(weighted.detach()) == pytest.approx(2.0 + 3 * 2.0 + 0.5)
    assert logs["depth"] == 8.0 and logs["loss"] == pytest.approx(8.5)  # terms logged unweighted
    weighted.backward()
    assert torch.all(losses["depth"].grad == 0)  # weight 0: no gradient from depth
    assert losses["action"].grad[0] == pytest.approx(3.0) and losses["action"].grad[1] == 0


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.loss_weights={actoin=2}", "train.loss_weights.actoin: expected one of video"),
        ("train.loss_weights={depth=-1}", "train.loss_weights.depth: expected a number >= 0"),
        ("train.loss_weights={depth=nan}", "train.loss_weights.depth. expects a finite number"),
    ],
)
def test_bad_weights_are_refused_with_the_key(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe("recipes/tiny_cpu.toml", [override])
