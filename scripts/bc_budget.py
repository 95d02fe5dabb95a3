"""How plain cloning's goal following and closed-loop success grow with its budget (docs/demo.md).

    MUJOCO_GL=egl python scripts/bc_budget.py out/demo/store                # the default grid
    MUJOCO_GL=egl python scripts/bc_budget.py STORE --runs 1400x8,2800x4    # UPDATESxBATCH pairs
    MUJOCO_GL=egl python scripts/bc_budget.py STORE --runs 1400x8x3e-3,700x256 --tasks push-v3 \
        --episodes 100 --seed 2000 --success                               # + learning rate, rollouts

Trains the state-only behaviour-cloning MLP (xwam_core.sim.bc, the closed-loop table's baseline) on the
store's training episodes (the split `xwam pretrain` makes with data.val_episodes, default 2) for each
UPDATESxBATCH pair (optionally UPDATESxBATCHxLR; the baseline's own rate, 1e-3, otherwise), and prints, per
task, the goal-following correlation of its first chunk on the held-out starts `xwam evaluate --sim` uses
(seed 1000): Pearson r across starts between the chunk's summed xyz actions and the scripted expert's over
the same steps. With --success each run is also rolled out from those starts as the closed-loop table rolls
BC out (--actions-per-query of its 32 actions open loop per query, default 8), with the 95% Wilson interval.
No images are rendered beyond what the simulator needs; a few minutes on a laptop CPU (100 push rollouts
per run: about 20 s).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from xwam_core.data.reader import EpisodeStore
from xwam_core.data.sources import metaworld as mw
from xwam_core.rtc_executor import ChunkExecutor
from xwam_core.sim import metaworld as sim_mw
from xwam_core.sim.bc import BCConfig, train_bc, training_episodes
from xwam_core.sim.scores import pearson, wilson_interval

DEFAULT_RUNS = "700x8,1400x8,1400x4,2800x4,2800x8,5600x4,3000x256"
CHUNK = 32  # actions per BC chunk: the tiny recipe's window (8 future frames x stride 4)


def _runs(text: str) -> list[tuple[int, int, float]]:
    """'UPDATESxBATCH[xLR],...' -> [(updates, batch, lr)]; the learning rate defaults to BCConfig's."""
    runs = []
    for item in text.split(","):
        parts = item.split("x")
        lr = BCConfig().lr
        ok = len(parts) in (2, 3) and all(p.isdigit() and int(p) > 0 for p in parts[:2])
        if ok and len(parts) == 3:
            try:
                lr = float(parts[2])
            except ValueError:
                ok = False
            ok = ok and 0.0 < lr < float("inf")
        if not ok:
            raise SystemExit(
                f"error: --runs item {item!r}: expected UPDATESxBATCH or UPDATESxBATCHxLR, e.g. 1400x8 or "
                "1400x8x3e-3"
            )
        runs.append((int(parts[0]), int(parts[1]), lr))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", help="a Meta-World store with the task state (recipes/tiny_cpu.toml's)")
    parser.add_argument(
        "--runs", default=DEFAULT_RUNS, help=f"UPDATESxBATCH[xLR] items (default {DEFAULT_RUNS}, LR 1e-3)"
    )
    parser.add_argument("--tasks", help="comma-separated tasks of the store (default: all of them)")
    parser.add_argument("--episodes", type=int, default=10, help="held-out starts per task (default 10)")
    parser.add_argument("--val-episodes", type=int, default=2, help="the held-out split (data.val_episodes)")
    parser.add_argument("--seed", type=int, default=1000, help="the held-out starts' seed (default 1000)")
    parser.add_argument("--success", action="store_true", help="also roll each run out from the starts")
    parser.add_argument(
        "--actions-per-query", type=int, default=8, help="--success: actions run per query (default 8)"
    )
    parser.add_argument("--bc-seed", type=int, default=0, help="the MLP's initialisation and batch order")
    parser.add_argument("--json", action="store_true", help="one JSON line per run")
    args = parser.parse_args()
    runs = _runs(args.runs)
    if args.episodes < 1:
        raise SystemExit(f"error: --episodes {args.episodes}: expected at least 1")
    if not 1 <= args.actions_per_query <= CHUNK:
        raise SystemExit(f"error: --actions-per-query {args.actions_per_query}: expected 1 to {CHUNK}")
    store = EpisodeStore(args.store)
    layouts = [name for name, names in mw.STATE_LAYOUTS.items() if names == list(store.state_names)]
    if not layouts:
        raise SystemExit(f"error: {args.store}: its state names match no Meta-World state layout")
    tasks = list(store.tasks) if not args.tasks else args.tasks.split(",")
    unknown = [t for t in tasks if t not in store.tasks]
    if unknown:
        raise SystemExit(f"error: --tasks {unknown[0]!r} is not a task of {args.store} ({list(store.tasks)})")
    episodes = training_episodes(store, args.val_episodes)
    # every model is trained before MuJoCo's EGL context exists: torch's first optimizer imports modules
    # that can crash inside a live EGL context
    trained = [
        (
            updates,
            batch,
            lr,
            train_bc(
                store,
                episodes,
                chunk=CHUNK,
                config=BCConfig(steps=updates, batch_size=batch, lr=lr, seed=args.bc_seed),
            ),
        )
        for updates, batch, lr in runs
    ]
    sim = mw._sim()
    gl = mw.gl_context(8, 8)
    gl.make_current()
    starts = {t: [sim_mw.eval_episode_seed(args.seed, t, i) for i in range(args.episodes)] for t in tasks}
    expert: dict[str, list[tuple[np.ndarray, int]]] = {}
    task_sims = {t: mw.TaskSim(sim, t, ["corner2"], 8, 8, "fast", layouts[0]) for t in tasks}
    for t in tasks:
        expert[t] = [sim_mw.expert_displacement(task_sims[t], s, CHUNK) for s in starts[t]]
    try:
        for updates, batch, lr, bc in trained:
            row: dict[str, object] = {
                "updates": updates,
                "batch": batch,
                "lr": lr,
                "bc_seed": args.bc_seed,
                "loss": round(bc.info["loss_final"], 4),
            }
            for t in tasks:
                moved, target = [], []
                for s, (summed, n) in zip(starts[t], expert[t], strict=True):
                    moved.append(sim_mw.first_chunk_displacement(bc, task_sims[t], gl, t, s, n))
                    target.append(summed)
                p, e = np.asarray(moved), np.asarray(target)
                row[t] = [None if (r := pearson(p[:, k], e[:, k])) is None else round(r, 2) for k in range(3)]
                if args.success:
                    bc.actions_per_query = args.actions_per_query
                    wins = 0
                    for i, s in enumerate(starts[t]):
                        executor = ChunkExecutor(bc, args.actions_per_query, 0, "naive")
                        wins += sim_mw._rollout(executor, task_sims[t], gl, t, i, s, "bc", 150, None).success
                    low, high = wilson_interval(wins, args.episodes)
                    row[f"{t}_success"] = [wins, args.episodes, round(low, 3), round(high, 3)]
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                parts = []
                for t in tasks:
                    parts.append(f"{t} r(x,y,z)={row[t]}")
                    if args.success:
                        wins, n, low, high = row[f"{t}_success"]  # type: ignore[misc]
                        parts.append(f"success {wins}/{n} [{100 * low:.0f}-{100 * high:.0f}%]")
                head = f"{updates:6d} updates x batch {batch:4d} lr {lr:g}  loss {row['loss']:.4f}"
                print(f"{head}  {'  '.join(parts)}", flush=True)
    finally:
        for task_sim in task_sims.values():
            task_sim.free()
        gl.free()


if __name__ == "__main__":
    main()
