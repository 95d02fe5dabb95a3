"""A behaviour-cloning baseline: a state-only MLP trained on the same store in well under a minute.

    episodes = training_episodes(store, spec.val_episodes)     # the model's own training split
    bc = train_bc(store, episodes, chunk=32, progress=progress)
    bc.reset(seed=0)
    action = bc.select_action({"state": state, "task": "reach-v3"})   # same interface as the Policy

What it sees: the current state, normalized with the store's statistics (2 (x - q01) / (q99 - q01) - 1,
xwam_core.normalizer), and the task (one-hot over the store's tasks). No images: it is the plain-cloning
floor a world-action model must beat. What it predicts: the next `chunk` actions (the model's chunk, so
the harness executes the same number of them per query), normalized the same way. Every frame of every
training episode is a sample; a chunk that runs past its episode's end is padded, and the padded actions
carry no loss (a mask, as LeRobot's `action_is_pad`), so the last frames before success are learned too.

Training: an MLP (3 hidden layers of 256, GELU) with AdamW on the masked mean squared error, a fixed
number of steps of fixed-size batches, seeded: the same store, episodes and options give the same weights.
Only the episodes passed in are read (the held-out ones never are: `training_episodes` gives the split
`xwam pretrain` made, xwam_core.data.windows.split_episodes).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from xwam_core.data.reader import EpisodeStore
from xwam_core.errors import XWAMError
from xwam_core.normalizer import Normalizer
from xwam_core.progress import SILENT, Progress


@dataclass
class BCConfig:
    hidden: int = 256
    layers: int = 3  # hidden layers
    steps: int = 3000
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0


def training_episodes(store: EpisodeStore, val_episodes: int) -> list[int]:
    """The episodes `xwam pretrain` trained on when it held out `val_episodes` (data.val_episodes)."""
    from xwam_core.data.windows import split_episodes

    return split_episodes(store, val_episodes)[0]


def _mlp(inputs: int, outputs: int, config: BCConfig) -> nn.Module:
    layers: list[nn.Module] = []
    width = inputs
    for _ in range(config.layers):
        layers += [nn.Linear(width, config.hidden), nn.GELU()]
        width = config.hidden
    layers.append(nn.Linear(width, outputs))
    return nn.Sequential(*layers)


def chunk_samples(
    state: np.ndarray, action: np.ndarray, starts: Sequence[int], lengths: Sequence[int], chunk: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every frame of the given episodes: its state (N, Ds), the next `chunk` actions (N, K, Da)
    (past the episode's end: its last action repeated) and the mask of real actions (N, K)."""
    frames, targets, masks = [], [], []
    steps = np.arange(chunk)
    for start, length in zip(starts, lengths, strict=True):
        t = np.arange(length)[:, None] + steps[None]  # (L, K) frame within the episode
        frames.append(start + np.arange(length))
        targets.append(start + np.minimum(t, length - 1))
        masks.append(t < length)
    f, tg, m = np.concatenate(frames), np.concatenate(targets), np.concatenate(masks)
    return state[f], action[tg], m


class BCPolicy:
    """A trained behaviour-cloning MLP with the Policy's acting interface (reset, select_action,
    predict_chunk, wants_observation, query_latencies_s, actions_per_query)."""

    def __init__(
        self,
        net: nn.Module,
        normalizer: Normalizer,
        tasks: list[str],
        chunk: int,
        actions_per_query: int | None = None,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.net = net.eval()
        self.normalizer = normalizer
        self.tasks = list(tasks)
        self.chunk = chunk
        self.actions_per_query = chunk if actions_per_query is None else actions_per_query
        if not 1 <= self.actions_per_query <= chunk:
            raise XWAMError(f"actions per query {actions_per_query}: expected 1 to the chunk's {chunk}")
        self.info: dict[str, Any] = dict(info or {})
        self._queue: list[np.ndarray] = []
        self.query_latencies_s: list[float] = []

    def reset(self, seed: int | None = None) -> None:
        """Forget queued actions (a new episode); the MLP is deterministic, so `seed` changes nothing."""
        self._queue = []
        self.query_latencies_s = []

    @property
    def wants_observation(self) -> bool:
        return not self._queue

    def select_action(self, obs: Mapping[str, Any]) -> np.ndarray:
        if not self._queue:
            self._queue = list(self.predict_chunk(obs)[: self.actions_per_query])
        return self._queue.pop(0)

    @torch.inference_mode()
    def predict_chunk(self, obs: Mapping[str, Any]) -> np.ndarray:
        """The next `chunk` actions (K, Da) in dataset units for one observation (its state and task)."""
        start = time.perf_counter()
        state = np.asarray(obs["state"], np.float32)
        if state.shape != (self.normalizer.state_dim,):
            raise XWAMError(
                f"behaviour cloning: state of shape {state.shape}, trained on ({self.normalizer.state_dim},)"
            )
        task = obs["task"]
        if task not in self.tasks:
            raise XWAMError(f"behaviour cloning: task {task!r} is not in its store ({self.tasks})")
        x = torch.from_numpy(
            _inputs(self.normalizer.state.normalize(state[None]), [self.tasks.index(task)], len(self.tasks))
        )
        y = self.net(x).reshape(self.chunk, self.normalizer.action_dim).numpy()
        self.query_latencies_s.append(time.perf_counter() - start)
        return np.asarray(self.normalizer.action.denormalize(y), np.float64)


def _inputs(state_norm: np.ndarray, task_index: Sequence[int] | np.ndarray, num_tasks: int) -> np.ndarray:
    onehot = np.zeros((len(state_norm), num_tasks), np.float32)
    onehot[np.arange(len(state_norm)), np.asarray(task_index)] = 1.0
    return np.concatenate([state_norm.astype(np.float32), onehot], axis=1)


def train_bc(
    store: EpisodeStore,
    episodes: Sequence[int],
    chunk: int,
    actions_per_query: int | None = None,
    config: BCConfig | None = None,
    progress: Progress = SILENT,
) -> BCPolicy:
    """Train the state-only MLP on `episodes` of `store` (only those are read); see the module docstring.
    `info` records what it was trained on, its training time and its loss (first and final)."""
    config = config or BCConfig()
    if chunk < 1:
        raise XWAMError(f"behaviour cloning: chunk {chunk}, expected >= 1")
    if not episodes:
        raise XWAMError(f"{store.path}: behaviour cloning needs at least one training episode")
    known = {e.index for e in store.episodes}
    unknown = [e for e in episodes if e not in known]
    if unknown:
        raise XWAMError(f"{store.path}: episodes {unknown} are not in the store")
    start_time = time.perf_counter()
    columns = store.read_columns(["observation.state", "action"])
    state = np.asarray(columns["observation.state"].to_pylist(), np.float32)
    action = np.asarray(columns["action"].to_pylist(), np.float32)
    metas = [store.episodes[e] for e in sorted(episodes)]
    normalizer = Normalizer.from_store_stats(store.stats, store.action_names, store.state_names)
    s, a, mask = chunk_samples(state, action, [m.start for m in metas], [m.length for m in metas], chunk)
    task_index = np.repeat([store.tasks.index(m.task) for m in metas], [m.length for m in metas])
    x = torch.from_numpy(_inputs(normalizer.state.normalize(s), task_index, len(store.tasks)))
    y = torch.from_numpy(normalizer.action.normalize(a)).reshape(len(x), -1)
    w = torch.from_numpy(np.repeat(mask, a.shape[-1], axis=1).astype(np.float32))  # (N, K * Da)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        net = _mlp(x.shape[1], y.shape[1], config)
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, config.steps, eta_min=config.lr * 0.05)
    bar = progress.task("behaviour cloning (state MLP)", total=config.steps)
    losses: list[float] = []
    batch = min(config.batch_size, len(x))
    net.train()
    for step in range(config.steps):
        idx = torch.randint(len(x), (batch,), generator=generator)
        err = (net(x[idx]) - y[idx]) ** 2 * w[idx]
        loss = err.sum() / w[idx].sum().clamp_min(1.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 100 == 0 or step + 1 == config.steps:
            bar.advance(100 if (step + 1) % 100 == 0 else (step + 1) % 100, info=f"loss {losses[-1]:.4f}")
    net.eval()
    with torch.inference_mode():  # the loss over every training sample, at the end
        final = float((((net(x) - y) ** 2) * w).sum() / w.sum().clamp_min(1.0))
    tail = max(1, len(losses) // 20)
    info = {
        "model": f"state-only MLP: state + task one-hot -> {chunk} actions; {config.layers} x {config.hidden} GELU",
        "config": asdict(config),
        "episodes": sorted(int(e) for e in episodes),
        "frames": len(x),
        "train_seconds": time.perf_counter() - start_time,
        "loss_first": float(np.mean(losses[:tail])),
        "loss_final": final,
        "loss": "masked MSE of normalized actions (padded actions past an episode's end excluded)",
    }
    return BCPolicy(net, normalizer, store.tasks, chunk, actions_per_query, info)
