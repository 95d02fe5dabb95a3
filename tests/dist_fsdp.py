"""Run by tests/test_train_fsdp.py under torchrun (gloo processes) or alone: trains the tiny recipe with
the overrides given and writes, per rank, the run's history (losses, grad_norm per step), what the
trainer described, and the step it resumed from; with XWAM_TEST_EXPORT set, the main process's export
of the final model goes there (every process takes part: the shards are gathered). With
XWAM_TEST_WRITE_DELAY set, checkpoint writes are slowed down and announced (tests/slow_checkpoints.py),
so a test can kill the run inside one."""

from __future__ import annotations

import json
import os
import sys

from xwam_core.recipe import load_recipe
from xwam_core.train import Trainer


def main() -> None:
    if os.environ.get("XWAM_TEST_WRITE_DELAY"):
        import tests.slow_checkpoints  # noqa: F401  (patches xwam_core.checkpoint's writers)

    recipe_path, record, resume = sys.argv[1], sys.argv[2], sys.argv[3]
    rank = int(os.environ.get("RANK", "0"))
    trainer = Trainer(load_recipe(recipe_path, sys.argv[4:]), resume=None if resume == "-" else resume)
    described = trainer.describe()
    start = trainer.step
    result = trainer.fit()
    export = os.environ.get("XWAM_TEST_EXPORT")
    if export:
        trainer.export(export)
    with open(f"{record}.rank{rank}.json", "w") as f:
        json.dump({"history": result.history, "start": start, "described": described}, f)


if __name__ == "__main__":
    main()
