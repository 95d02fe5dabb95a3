"""The one normalization of actions and states: 2 (x - q01) / (q99 - q01) - 1 per dimension.

`QuantileNormalizer` is the arithmetic; `Normalizer` is what a checkpoint carries: the action and state
quantiles with their names, and how many of the model's (padded) dimensions are real. Training windows
are normalized with the store's statistics, a Policy with its checkpoint's: both through this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from xwam_core.errors import XWAMError


class QuantileNormalizer:
    """x -> 2 (x - q01) / (q99 - q01) - 1 per dimension (docs/method.md section 2), and back.

    Dimensions whose q01 == q99 (constant in the data) map to 0 and back to their constant. Bounds given
    the other way round (q01 > q99) flip the sign: 2 (x - q01) / (q99 - q01) - 1 = -(2 (x - q99) / (q01 - q99)
    - 1), which is how a checkpoint states a sign flip (the authors' release flips some grippers).
    """

    def __init__(self, q01: np.ndarray, q99: np.ndarray):
        self.q01 = np.asarray(q01, dtype=np.float32)
        self.q99 = np.asarray(q99, dtype=np.float32)
        span = self.q99 - self.q01
        self.constant = np.abs(span) <= 1e-8
        self.span = np.where(self.constant, 1.0, span).astype(np.float32)

    @classmethod
    def from_stats(cls, stats: dict[str, Any], key: str) -> QuantileNormalizer:
        return cls(np.asarray(stats[key]["q01"]), np.asarray(stats[key]["q99"]))

    def normalize(self, x: np.ndarray) -> np.ndarray:
        out = 2.0 * (x - self.q01) / self.span - 1.0
        return np.where(self.constant, 0.0, out).astype(np.float32)

    def denormalize(self, y: Any) -> Any:
        """Works on numpy arrays and torch tensors (..., D)."""
        if hasattr(y, "new_tensor"):
            q01, span = y.new_tensor(self.q01), y.new_tensor(self.span)
            x = (y + 1.0) * 0.5 * span + q01
            const = y.new_tensor(self.constant).bool()
            return x.where(~const, q01)
        x = (np.asarray(y) + 1.0) * 0.5 * self.span + self.q01
        return np.where(self.constant, self.q01, x).astype(np.float32)


STAT_KEYS = ("q01", "q99", "mean", "std", "min", "max")


@dataclass
class Normalizer:
    """Action and state normalization with their dimension names (the store's, unpadded) and statistics.

    The model may be wider (model.action_dim = 14 for one-arm data of 7): its first len(names) dimensions
    are real and the rest is padding, masked out of the losses and dropped from predictions.
    `stats[key][stat]` keeps the store's per-dimension q01, q99, mean, std, min, max (key: action, state),
    e.g. for the mean-action baseline.
    """

    action_names: list[str]
    state_names: list[str]
    stats: dict[str, dict[str, list[float]]]
    # how q01/q99 were chosen (data.normalization): "quantile" (the store's) or "release" (the X-WAM
    # release's rules, xwam_core.data.release_stats); the arithmetic is the same
    normalization: str = "quantile"

    def __post_init__(self) -> None:
        for key, names in (("action", self.action_names), ("state", self.state_names)):
            for stat in ("q01", "q99"):
                values = self.stats.get(key, {}).get(stat)
                if values is None or np.asarray(values).shape != (len(names),):
                    raise XWAMError(
                        f"{key} statistics: expected {stat} with {len(names)} values (one per {key} "
                        f"dimension), got {values if values is None else np.asarray(values).shape}"
                    )
        self.action = QuantileNormalizer(
            np.asarray(self.stats["action"]["q01"]), np.asarray(self.stats["action"]["q99"])
        )
        self.state = QuantileNormalizer(
            np.asarray(self.stats["state"]["q01"]), np.asarray(self.stats["state"]["q99"])
        )

    @classmethod
    def from_store_stats(
        cls, stats: dict[str, Any], action_names: list[str], state_names: list[str]
    ) -> Normalizer:
        """From a store's meta/stats.json (keys `action` and `observation.state`)."""
        picked = {
            key: {k: list(v) for k, v in stats.get(source, {}).items() if k in STAT_KEYS}
            for key, source in (("action", "action"), ("state", "observation.state"))
        }
        return cls(list(action_names), list(state_names), picked)

    @property
    def action_dim(self) -> int:
        return len(self.action_names)

    @property
    def state_dim(self) -> int:
        return len(self.state_names)

    @property
    def has_mean_action(self) -> bool:
        """Whether the statistics hold the mean action (a converted release checkpoint has only q01/q99)."""
        return "mean" in self.stats.get("action", {})

    def mean_action(self) -> np.ndarray:
        """(Da,) float64: the training data's mean action (the mean-action baseline)."""
        return np.asarray(self.stats["action"]["mean"], dtype=np.float64)

    def to_json(self) -> dict[str, Any]:
        rule = (
            "2 (x - q01) / (q99 - q01) - 1 per dimension; constant dimensions (q01 == q99) map to 0; "
            "q01 > q99 flips the sign"
        )
        if self.normalization == "release":
            rule += (
                "; q01/q99 by the X-WAM release's rules (data.normalization = 'release'): quaternion state "
                "dimensions -1/1 (identity), gripper state dimensions share one pooled pair, action bounds "
                "symmetric +-max(|q01|, |q99|), gripper actions' quantiles over the steps where the gripper moves"
            )
        else:
            rule += "; q01/q99: the store's 1st/99th percentiles (data.normalization = 'quantile')"
        return {
            "rule": rule,
            "normalization": self.normalization,
            "action_names": self.action_names,
            "state_names": self.state_names,
            "stats": self.stats,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Normalizer:
        return cls(
            list(data["action_names"]),
            list(data["state_names"]),
            dict(data["stats"]),
            str(data.get("normalization", "quantile")),
        )
