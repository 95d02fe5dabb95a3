#!/usr/bin/env bash
# Success vs simulated inference delay, naive chunk switching vs real-time chunking (docs/rtc.md).
# usage: scripts/rtc_delay_table.sh CKPT OUT [EPISODES_PER_TASK] [DELAYS]
#   CKPT: the demo's checkpoint (out/demo/run after `nox -s demo`); OUT: a folder for one JSON per cell.
# The two chunkings run side by side (one process each, one thread each); then the markdown table.
set -euo pipefail
CKPT=$1; OUT=$2; EPISODES=${3:-10}; DELAYS=${4:-"0 2 4 8"}
XWAM=${XWAM:-xwam}  # word-split: e.g. "python -m xwam_cli.main"
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=1 MUJOCO_GL=${MUJOCO_GL:-egl}
mkdir -p "$OUT"
for chunking in naive rtc; do
  (
    for d in $DELAYS; do
      [ -f "$OUT/${chunking}_d$d.json" ] && continue  # resumable: finished cells are kept
      $XWAM evaluate --sim metaworld --ckpt "$CKPT" --tasks reach-v3,push-v3 --episodes "$EPISODES" \
        --seed 1000 --actions-per-query 8 --baselines none --inference-delay "$d" --chunking "$chunking" \
        --out "$OUT/${chunking}_d$d.json" > "$OUT/${chunking}_d$d.log" 2>&1
    done
  ) &
done
wait
"$PYTHON" - "$OUT" $DELAYS <<'PY'
import json, sys
from pathlib import Path
from xwam_core.sim.scores import wilson_interval

out, delays = Path(sys.argv[1]), sys.argv[2:]
def cell(data, task=None):
    s = data["success_rate"]["successes"]
    k, n = s["per_task"][task]["model"] if task else s["mean"]["model"]
    lo, hi = wilson_interval(k, n)
    return f"{k}/{n} ({100 * k / n:.0f}%) [{100 * lo:.0f}-{100 * hi:.0f}]"
print("| delay d (steps) | chunking | reach-v3 | push-v3 | both | chunk-switch gap | ms per query |")
print("|---|---|---|---|---|---|---|")
for d in delays:
    for c in ("naive", "rtc"):
        data = json.loads((out / f"{c}_d{d}.json").read_text())
        gap = data["model_switch_jump_mean"]
        print(f"| {d} | {c} | {cell(data, 'reach-v3')} | {cell(data, 'push-v3')} | {cell(data)} | "
              f"{'—' if gap is None else f'{gap:.3f}'} | {data['model_latency_ms_mean']:.0f} |")
PY
