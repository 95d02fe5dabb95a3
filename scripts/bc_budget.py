"""How many optimizer updates plain cloning needs before its first chunk follows the goal (docs/demo.md).

    MUJOCO_GL=egl python scripts/bc_budget.py out/demo/store                # the default grid
    MUJOCO_GL=egl python scripts/bc_budget.py STORE --runs 1400x8,2800x4    # UPDATESxBATCH pairs

Trains the state-only behaviour-cloning MLP (xwam_core.sim.bc, the closed-loop table's baseline) on the
store's training episodes (the split `xwam pretrain` makes with data.val_episodes, default 2) for each
UPDATESxBATCH pair, and prints, per task, the goal-following correlation of its first chunk on the held-out
starts `xwam evaluate --sim` uses (seed 1000): Pearson r across starts between the chunk's summed xyz
actions and the scripted expert's over the same steps. No images are rendered beyond what the simulator
needs; a few minutes on a laptop CPU.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from xwam_core.data.reader import EpisodeStore
from xwam_core.data.sources import metaworld as mw
from xwam_core.sim import metaworld as sim_mw
from xwam_core.sim.bc import BCConfig, train_bc, training_episodes
from xwam_core.sim.scores import pearson

DEFAULT_RUNS = "700x8,1400x8,1400x4,2800x4,2800x8,5600x4,3000x256"


def _pairs(text: str) -> list[tuple[int, int]]:
    pairs = []
    for item in text.split(","):
        updates, _, batch = item.partition("x")
        if not (updates.isdigit() and batch.isdigit() and int(updates) > 0 and int(batch) > 0):
            raise SystemExit(f"error: --runs item {item!r}: expected UPDATESxBATCH, e.g. 1400x8")
        pairs.append((int(updates), int(batch)))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", help="a Meta-World store with the task state (recipes/tiny_cpu.toml's)")
    parser.add_argument("--runs", default=DEFAULT_RUNS, help=f"UPDATESxBATCH pairs (default {DEFAULT_RUNS})")
    parser.add_argument("--episodes", type=int, default=10, help="held-out starts per task (default 10)")
    parser.add_argument("--val-episodes", type=int, default=2, help="the held-out split (data.val_episodes)")
    parser.add_argument("--seed", type=int, default=1000, help="the held-out starts' seed (default 1000)")
    parser.add_argument("--json", action="store_true", help="one JSON line per run")
    args = parser.parse_args()
    runs = _pairs(args.runs)
    store = EpisodeStore(args.store)
    layouts = [name for name, names in mw.STATE_LAYOUTS.items() if names == list(store.state_names)]
    if not layouts:
        raise SystemExit(f"error: {args.store}: its state names match no Meta-World state layout")
    episodes = training_episodes(store, args.val_episodes)
    # every model is trained before MuJoCo's EGL context exists: torch's first optimizer imports modules
    # that can crash inside a live EGL context
    trained = [
        (
            updates,
            batch,
            train_bc(store, episodes, chunk=32, config=BCConfig(steps=updates, batch_size=batch)),
        )
        for updates, batch in runs
    ]
    sim = mw._sim()
    gl = mw.gl_context(8, 8)
    gl.make_current()
    tasks = list(store.tasks)
    starts = {t: [sim_mw.eval_episode_seed(args.seed, t, i) for i in range(args.episodes)] for t in tasks}
    expert: dict[str, list[tuple[np.ndarray, int]]] = {}
    task_sims = {t: mw.TaskSim(sim, t, ["corner2"], 8, 8, "fast", layouts[0]) for t in tasks}
    for t in tasks:
        expert[t] = [sim_mw.expert_displacement(task_sims[t], s, 32) for s in starts[t]]
    try:
        for updates, batch, bc in trained:
            row: dict[str, object] = {
                "updates": updates,
                "batch": batch,
                "loss": round(bc.info["loss_final"], 4),
            }
            for t in tasks:
                moved, target = [], []
                for s, (summed, n) in zip(starts[t], expert[t], strict=True):
                    moved.append(sim_mw.first_chunk_displacement(bc, task_sims[t], gl, t, s, n))
                    target.append(summed)
                p, e = np.asarray(moved), np.asarray(target)
                row[t] = [None if (r := pearson(p[:, k], e[:, k])) is None else round(r, 2) for k in range(3)]
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                rs = "  ".join(f"{t} r(x,y,z)={row[t]}" for t in tasks)
                print(f"{updates:6d} updates x batch {batch:4d}  loss {row['loss']:.4f}  {rs}", flush=True)
    finally:
        for task_sim in task_sims.values():
            task_sim.free()
        gl.free()


if __name__ == "__main__":
    main()
