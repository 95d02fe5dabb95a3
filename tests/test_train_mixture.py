"""Mixtures of stores and the per-rank data order: compatible-store checks, weighted quotas, merged
normalization, and (Must-show) a 2-process gloo training on a mixture of two format-2 stores in which
each rank reads only its shard, an epoch is every window exactly once, and a resume mid-epoch continues
the same order."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SyntheticSource, free_port, write_store
from xwam_core.data.mixture import MixtureDataset, check_compatible, weighted_quantiles
from xwam_core.data.reader import EpisodeStore
from xwam_core.data.sampler import GlobalBatchSampler, quotas
from xwam_core.data.windows import WindowDataset, WindowLayout
from xwam_core.errors import DataError, RecipeError, XWAMError
from xwam_core.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny_cpu.toml"


@pytest.fixture(scope="module")
def two_stores(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mixture")
    a, b = root / "a", root / "b"
    write_store(a, SyntheticSource(episodes=3, length=10, size=(32, 32), views=("a", "b"), seed=1))
    write_store(
        b,
        SyntheticSource(
            episodes=3, length=8, size=(32, 32), views=("a", "b"), seed=2, tasks=("push", "pick")
        ),
    )
    return a, b


def test_stores_must_agree(two_stores, tmp_path):
    a, b = two_stores
    check_compatible([EpisodeStore(a), EpisodeStore(b)])
    other = tmp_path / "c"
    write_store(other, SyntheticSource(episodes=1, length=8, size=(32, 40), views=("a", "b")))
    with pytest.raises(DataError, match=r"c: image size \(32, 40\) differ from .*a's \(32, 32\)") as err:
        check_compatible([EpisodeStore(a), EpisodeStore(other)])
    assert "\n" not in str(err.value)
    with pytest.raises(DataError, match=r"has no view\(s\) \['c'\]"):
        check_compatible([EpisodeStore(a), EpisodeStore(b)], ["a", "c"])


def test_recipe_mixture_keys(two_stores, tmp_path):
    a, b = two_stores
    mixed = [
        'data.store=""',  # tiny_cpu.toml names one store
        f'data.mixture=[{{store = "{a}", weight = 3}}, {{store = "{b}", weight = 1, val_episodes = 0}}]',
    ]
    recipe = load_recipe(TINY, mixed)
    assert [(e.store, e.weight, e.val_episodes) for e in recipe.data.entries()] == [
        (str(a), 3.0, -1),
        (str(b), 1.0, 0),
    ]
    assert [e.store for e in load_recipe(TINY, [f"data.store={a}"]).data.entries()] == [str(a)]
    # a --set of data.mixture alone replaces the recipe file's data.store, and data.store alone a file's mixture
    only_mixture = load_recipe(TINY, mixed[1:])
    assert only_mixture.data.store == "" and [e.store for e in only_mixture.data.entries()] == [
        str(a),
        str(b),
    ]
    mixture_file = tmp_path / "mixture.toml"
    mixture_file.write_text(
        TINY.read_text().replace(
            'store = "out/demo/store"', f'mixture = [{{store = "{a}"}}, {{store = "{b}"}}]'
        )
    )
    assert [e.store for e in load_recipe(mixture_file).data.entries()] == [str(a), str(b)]
    one = load_recipe(mixture_file, [f"data.store={b}"])
    assert one.data.mixture == [] and [e.store for e in one.data.entries()] == [str(b)]
    both_in_file = tmp_path / "both.toml"
    both_in_file.write_text(
        TINY.read_text().replace('store = "out/demo/store"', f'store = "{a}"\nmixture = [{{store = "{b}"}}]')
    )
    for path, sets in ((both_in_file, []), (both_in_file, ["data.batch_size=4"])):
        with pytest.raises(RecipeError, match="not both") as err:
            load_recipe(path, sets)
        assert "\n" not in str(err.value)
    for bad, needle in (
        (['data.store=""', f'data.mixture=[{{store = "{a}", weight = 1}}, {{store = "{b}"}}]'], "or on none"),
        ([f'data.mixture=[{{store = "{a}"}}]', f"data.store={a}"], "not both .a --set of one replaces"),
        (['data.store=""', f'data.mixture=[{{store = "{a}", weight = -1}}]'], r"weight.*>= 0"),
        (["data.frame_cache=maybe"], "auto, on or off"),
    ):
        with pytest.raises(RecipeError, match=needle) as err:
            load_recipe(TINY, bad)
        assert "\n" not in str(err.value)


def test_weighted_quotas_draw_each_store_without_repeats():
    assert quotas([20, 16], None) == [20, 16] and quotas([20, 16], [0, 0]) == [20, 16]
    assert quotas([20, 16], [3, 1]) == [27, 9] and sum(quotas([7, 5, 3], [1, 1, 1])) == 15
    sampler = GlobalBatchSampler([20, 16], 4, 0, 1, seed=5, weights=[3, 1])
    epochs = [sampler.order(e).numpy() for e in range(4)]
    for order in epochs:
        assert len(order) == 36 and (order < 20).sum() == 27  # store 0's share of the draws
    for e, order in enumerate(epochs):
        assert sorted(order.tolist()) == sorted(sampler.draws(e).tolist())  # the draws, shuffled
    stream = np.concatenate([sampler.draws(e)[27:] for e in range(4)])  # store 1: 9 an epoch of 16 windows
    assert (
        sorted(stream[:16].tolist()) == sorted(stream[16:32].tolist()) == list(range(20, 36))
    )  # all, then again
    assert [o.tolist() for o in epochs] == [sampler.order(e).tolist() for e in range(4)]  # deterministic


def test_merged_normalization_weights_the_stores(two_stores):
    a, b = two_stores
    layout = WindowLayout(2, 2)
    parts = [WindowDataset(a, layout, pad_episode_ends=True), WindowDataset(b, layout, pad_episode_ends=True)]
    one = MixtureDataset(parts[:1])
    assert one.normalizer is parts[0].normalizer  # a mixture of one: the store's own statistics
    mixed = MixtureDataset(parts, shares=[0.5, 0.5])
    pooled = np.concatenate([np.asarray(p.cache.action) for p in parts])
    weights = np.concatenate([np.full(30, 0.5 / 30), np.full(24, 0.5 / 24)])
    q01, q99 = weighted_quantiles(pooled.astype(np.float64), weights, (0.01, 0.99))
    np.testing.assert_allclose(mixed.normalizer.stats["action"]["q01"], q01)
    np.testing.assert_allclose(mixed.normalizer.stats["action"]["q99"], q99)
    assert mixed.tasks == ["reach", "push", "pick"]
    item = mixed[len(mixed) - 1]
    assert item["store_index"] == 1 and mixed.tasks[item["task_index"]] in ("push", "pick")


def _record(path: Path) -> list[dict]:
    return [json.loads(Path(f"{path}.rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_two_ranks_on_a_mixture_read_their_shards_and_resume_mid_epoch(two_stores, tmp_path):
    a, b = two_stores
    # 2 + 2 training episodes (one of each store held out): 20 + 16 = 36 windows, 9 global batches of 4
    overrides = [
        'data.store=""',
        f'data.mixture=[{{store = "{a}"}}, {{store = "{b}"}}]',
        "data.future_frames=4",
        "data.frame_stride=1",
        "inference.actions_per_query=0",
        "data.batch_size=4",
        "data.val_episodes=1",
        "data.num_workers=0",
        "data.frame_cache=off",  # the loader decodes the format-2 videos itself
        "model.overrides={num_layers = 1, num_depth_blocks = 1}",
        "train.max_steps=9",
        "train.checkpoint_every=4",
        "train.keep_last=5",
        "train.val_every=0",
        "train.warmup_steps=1",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def launch(out: Path, record: Path, resume: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               str(ROOT / "tests" / "dist_mixture.py"), str(TINY), str(record), resume, *overrides, f"train.out={out}"]  # fmt: skip
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    full = tmp_path / "full"
    launch(full, tmp_path / "full", "-")
    ranks = _record(tmp_path / "full")
    assert ranks[0]["windows"] == [20, 16]
    every = {
        (s, e, f)
        for s, n_eps, length in ((0, (0, 1), 10), (1, (0, 1), 8))
        for e in n_eps
        for f in range(length)
    }
    seen = [tuple(w) for r in ranks for step in r["steps"].values() for w in step]
    assert len(seen) == 36 and set(seen) == every  # the epoch: every window exactly once
    for r in ranks:
        mine = [tuple(w) for step in r["steps"].values() for w in step]
        assert len(mine) == 18 and {tuple(w) for w in r["reads"]} == set(mine)  # read only its shard
    assert not set(map(tuple, ranks[0]["reads"])) & set(map(tuple, ranks[1]["reads"]))

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-00000004", resumed / "checkpoints" / "step-00000004")
    launch(resumed, tmp_path / "again", str(resumed / "checkpoints" / "step-00000004"))
    again = _record(tmp_path / "again")
    for r in (0, 1):
        assert sorted(again[r]["steps"], key=int) == [str(s) for s in range(5, 10)]
        assert {k: v for k, v in ranks[r]["steps"].items() if int(k) > 4} == again[r]["steps"]
    trainer = json.loads(
        (resumed / "checkpoints" / "step-00000009" / "training" / "trainer.json").read_text()
    )
    assert trainer["sampler"]["epoch"] == 1 and trainer["sampler"]["windows"] == [20, 16]


def test_resume_on_other_data_is_refused():
    sampler = GlobalBatchSampler([20, 16], 4, 0, 2, seed=0)
    saved = sampler.state(4)
    assert saved == {
        "epoch": 0,
        "batch": 4,
        "seed": 0,
        "global_batch": 4,
        "windows": [20, 16],
        "quotas": [20, 16],
    }
    with pytest.raises(
        XWAMError, match=r"ckpt: the run's data order had windows \[20, 16\], .* give \[20, 12\]"
    ):
        GlobalBatchSampler([20, 12], 4, 0, 2, seed=0).check(saved, 4, "ckpt")


def test_large_orders_are_keyed_permutations_per_position(monkeypatch):
    from xwam_core.data import sampler as sampler_module
    from xwam_core.data.sampler import keyed_permutation

    for n in (1, 2, 5, 1000, 4097):
        image = keyed_permutation(np.arange(n), n, key=7)
        assert sorted(image.tolist()) == list(range(n))  # a bijection of [0, n)
        assert (image == keyed_permutation(np.arange(n), n, key=7)).all()
    assert (keyed_permutation(np.arange(1000), 1000, 7) != keyed_permutation(np.arange(1000), 1000, 8)).any()
    monkeypatch.setattr(sampler_module, "PERMUTED_LIMIT", 10)  # the large path on a small mixture
    for weights in (None, [3, 1]):
        shards = [GlobalBatchSampler([20, 16], 4, r, 2, seed=1, weights=weights).shard(0) for r in (0, 1)]
        whole = GlobalBatchSampler([20, 16], 4, 0, 1, seed=1, weights=weights)
        seen = np.concatenate([s.numpy().ravel() for s in shards])
        if weights is None:
            assert sorted(seen.tolist()) == list(range(36))  # every window once
        else:
            assert (seen < 20).sum() == 27 and len(set(seen[seen >= 20].tolist())) == 9  # quotas, no repeats
        assert sorted(seen.tolist()) == sorted(whole.shard(0).numpy().ravel().tolist())
        resumed = iter(GlobalBatchSampler([20, 16], 4, 1, 2, seed=1, start_step=3, weights=weights))
        assert next(resumed) == shards[1][3].tolist()
