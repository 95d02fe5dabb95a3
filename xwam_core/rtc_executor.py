"""Executing action chunks while the next one is computed: naive switching or real-time chunking.

    executor = ChunkExecutor(policy, actions_per_query=8, inference_delay=4, chunking="rtc")
    executor.reset(seed=0)
    while not done:
        if executor.wants_observation:       # a query starts at this control step
            obs = observe()
        action = executor.select_action(obs)  # the action to run now

The clock is the control step. A query starts every `actions_per_query` (s) steps and its chunk arrives
`inference_delay` (d) steps later; meanwhile the chunk already executing keeps running, so the new
chunk's first d actions are stale when it arrives and it takes over at its index d. The first query of an
episode has nothing to run meanwhile: the robot waits for it and its chunk runs from index 0. Each chunk
thus runs s actions (the first one s + d) and the executor needs s + d <= K and d <= s.

- naive: the new chunk is sampled as usual and switched to on arrival (the paper's naive asynchronous
  baseline: a jump wherever the new chunk disagrees with the old one).
- rtc: the actor is asked for `predict_chunk(obs, prev_chunk=old[s:], inference_delay=d)`, so the new
  chunk's first d actions are the old chunk's (those that run during the query) and its overlap continues
  the old chunk (xwam_core.schedule.rtc).

Any actor with `reset(seed)` and `predict_chunk(obs, prev_chunk=None, inference_delay=0)` works (the
Policy; a client of a policy server); naive chunking needs only `predict_chunk(obs)`. In simulation the
delay is simulated: the query runs to completion at its start step, and the loop's clock advances d steps
on the old chunk before the new one takes over, exactly as if it had taken d steps of wall time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from xwam_core.errors import XWAMError

CHUNKINGS = ("naive", "rtc")


class ChunkActor(Protocol):
    """A chunk policy: the Policy's acting interface (xwam_core.policy)."""

    def reset(self, seed: int | None = None) -> None: ...

    def predict_chunk(self, obs: Mapping[str, Any], **kwargs: Any) -> np.ndarray: ...


def check_chunking(
    actions_per_query: int, inference_delay: int, chunking: str, chunk: int | None = None
) -> None:
    """One-line errors for an executor's options (`chunk` = K when known)."""
    if chunking not in CHUNKINGS:
        raise XWAMError(f"--chunking {chunking!r}: expected one of {', '.join(CHUNKINGS)}")
    if actions_per_query < 1:
        raise XWAMError(f"--actions-per-query {actions_per_query}: expected an integer >= 1")
    if not 0 <= inference_delay <= actions_per_query:
        raise XWAMError(
            f"--inference-delay {inference_delay}: expected 0 to the actions executed per query "
            f"({actions_per_query}) control steps"
        )
    if chunk is not None and actions_per_query + inference_delay > chunk:
        raise XWAMError(
            f"--inference-delay {inference_delay} with {actions_per_query} actions per query needs chunks of "
            f"at least {actions_per_query + inference_delay} actions; the policy predicts {chunk}"
        )


class ChunkExecutor:
    """Which action runs at each control step when a chunk policy is queried every `actions_per_query`
    steps and each query takes `inference_delay` steps. One per episode stream; `reset` between episodes."""

    def __init__(
        self, actor: ChunkActor, actions_per_query: int, inference_delay: int = 0, chunking: str = "naive"
    ):
        check_chunking(actions_per_query, inference_delay, chunking)
        self.actor = actor
        self.actions_per_query = actions_per_query
        self.inference_delay = inference_delay
        self.chunking = chunking
        self.reset_state()

    def reset_state(self) -> None:
        self._chunk: np.ndarray | None = None  # (K, Da) the chunk executing now
        self._index = 0  # its row that runs at the next step
        self._pending: np.ndarray | None = None  # the chunk being "computed"
        self._arrives_in = 0  # steps until it takes over
        self._steps_to_query = 0
        self.queries = 0
        # per switch: |the new chunk's first action run - the old chunk's action for that step| (how far
        # the plans disagree where one takes over; none when the old chunk has no action for that step)
        self.switch_jumps: list[float] = []

    def reset(self, seed: int | None = None) -> None:
        """A new episode: forget the chunks; reset the actor (its noise seeded by `seed`)."""
        self.actor.reset(seed=seed)
        self.reset_state()

    @property
    def wants_observation(self) -> bool:
        """True when the next select_action starts a query (so the caller must observe now)."""
        return self._chunk is None or self._steps_to_query == 0

    def _query(self, obs: Mapping[str, Any], remaining: np.ndarray | None) -> np.ndarray:
        self.queries += 1
        if remaining is None or self.chunking == "naive":
            chunk = np.asarray(self.actor.predict_chunk(obs))
        else:
            chunk = np.asarray(
                self.actor.predict_chunk(obs, prev_chunk=remaining, inference_delay=self.inference_delay)
            )
        check_chunking(self.actions_per_query, self.inference_delay, self.chunking, len(chunk))
        return chunk

    def select_action(self, obs: Mapping[str, Any]) -> np.ndarray:
        """The action (Da,) to run at this step; `obs` is read only when wants_observation was True."""
        if self._chunk is None:  # the episode's first query: the robot waits for it
            self._chunk = self._query(obs, None)
            self._index = 0
            self._steps_to_query = self.actions_per_query
        elif self._steps_to_query == 0:
            new = self._query(obs, self._chunk[self._index :])
            self._steps_to_query = self.actions_per_query
            if self.inference_delay == 0:
                self._switch(new)
            else:
                self._pending, self._arrives_in = new, self.inference_delay
        action = self._chunk[self._index]
        self._index += 1
        self._steps_to_query -= 1
        if self._pending is not None:
            self._arrives_in -= 1
            if self._arrives_in == 0:  # computed: it takes over at the next step
                self._switch(self._pending)
                self._pending = None
        return action

    def _switch(self, new: np.ndarray) -> None:
        assert self._chunk is not None
        if self._index < len(self._chunk):
            self.switch_jumps.append(
                float(np.linalg.norm(new[self.inference_delay] - self._chunk[self._index]))
            )
        self._chunk, self._index = new, self.inference_delay
