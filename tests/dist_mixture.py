"""Run by tests/test_train_mixture.py under torchrun (2 gloo processes): trains on a mixture and writes,
per rank, the windows each step trained on and every window the rank's dataset read."""

from __future__ import annotations

import json
import os
import sys

from xwam_core.data.mixture import MixtureDataset
from xwam_core.recipe import load_recipe
from xwam_core.train import Trainer


def main() -> None:
    recipe_path, record, resume = sys.argv[1], sys.argv[2], sys.argv[3]
    overrides = sys.argv[4:]
    rank = int(os.environ.get("RANK", "0"))
    reads: list[list[int]] = []
    original = MixtureDataset.__getitem__

    def recording(self, i):  # num_workers=0: reads happen in this process
        item = original(self, i)
        if self is trainer.train_set:
            reads.append([int(item["store_index"]), int(item["episode_index"]), int(item["frame_index"])])
        return item

    MixtureDataset.__getitem__ = recording  # type: ignore[method-assign]
    trainer = Trainer(load_recipe(recipe_path, overrides), resume=None if resume == "-" else resume)
    steps: dict[int, list[list[int]]] = {}
    step = trainer.train_step

    def recorded_step(batch):
        ids = zip(
            batch["store_index"].tolist(),
            batch["episode_index"].tolist(),
            batch["frame_index"].tolist(),
            strict=True,
        )
        steps[trainer.step + 1] = [list(x) for x in ids]
        return step(batch)

    trainer.train_step = recorded_step  # type: ignore[method-assign]
    trainer.fit()
    with open(f"{record}.rank{rank}.json", "w") as f:
        json.dump({"steps": steps, "reads": reads, "windows": trainer.train_set.sizes}, f)


if __name__ == "__main__":
    main()
