#!/usr/bin/env bash
# Success vs simulated inference delay, naive chunk switching vs real-time chunking (docs/rtc.md).
# usage: scripts/rtc_delay_table.sh CKPT OUT [EPISODES_PER_TASK] [DELAYS] [SEEDS]
#   CKPT: the demo's checkpoint (out/demo/run after `nox -s demo`); OUT: a folder for one JSON per cell
#   and seed; SEEDS: seeds of the held-out starts (default 1000, the demo's), pooled in the table.
# The chunkings run side by side (one process each, one thread each; CHUNKINGS="naive rtc"), each cell
# once (a rerun keeps finished cells); then the markdown table.
set -euo pipefail
CKPT=$1; OUT=$2; EPISODES=${3:-10}; DELAYS=${4:-"0 2 4 8"}; SEEDS=${5:-1000}
XWAM=${XWAM:-xwam}  # word-split: e.g. "python -m xwam_cli.main"
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=1 MUJOCO_GL=${MUJOCO_GL:-egl}
mkdir -p "$OUT"
for chunking in ${CHUNKINGS:-naive rtc}; do
  (
    for seed in $SEEDS; do
      for d in $DELAYS; do
        cell="$OUT/${chunking}_d${d}_seed${seed}"
        [ -f "$cell.json" ] && continue
        $XWAM evaluate --sim metaworld --ckpt "$CKPT" --tasks reach-v3,push-v3 --episodes "$EPISODES" \
          --seed "$seed" --actions-per-query 8 --baselines none --inference-delay "$d" \
          --chunking "$chunking" --out "$cell.json" > "$cell.log" 2>&1
      done
    done
  ) &
done
wait
"$PYTHON" - "$OUT" "$DELAYS" "$SEEDS" <<'PY'
import json, sys
from pathlib import Path
from xwam_core.sim.scores import wilson_interval

out, delays, seeds = Path(sys.argv[1]), sys.argv[2].split(), sys.argv[3].split()

def cell(runs, task=None):
    k = n = 0
    for data in runs:
        s = data["success_rate"]["successes"]
        kk, nn = s["per_task"][task]["model"] if task else s["mean"]["model"]
        k, n = k + kk, n + nn
    lo, hi = wilson_interval(k, n)
    return f"{k}/{n} ({100 * k / n:.0f}%) [{100 * lo:.0f}-{100 * hi:.0f}]"

print(f"held-out starts of seeds {', '.join(seeds)}, pooled; 95% Wilson intervals in brackets")
print("| delay d (steps) | chunking | reach-v3 | push-v3 | both | plan gap at a switch |")
print("|---|---|---|---|---|---|")
for d in delays:
    for c in ("naive", "rtc"):
        runs = [json.loads((out / f"{c}_d{d}_seed{seed}.json").read_text()) for seed in seeds]
        gaps = [r["rollouts"] for r in runs]
        gap = [x["switch_jump"] for rs in gaps for x in rs if x["switch_jump"] is not None]
        print(f"| {d} | {c} | {cell(runs, 'reach-v3')} | {cell(runs, 'push-v3')} | {cell(runs)} | "
              f"{sum(gap) / len(gap):.3f} |")
PY
