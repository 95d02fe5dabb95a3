"""Text conditioners and UMT5 prompt encoding (on a tiny random UMT5 saved locally)."""

from __future__ import annotations

import sys

import pytest
import torch

from tests.umt5_fixtures import make_umt5_dir
from xwam_core.errors import XWAMError
from xwam_core.models.text import PrecomputedText, TaskEmbeddingText, encode_prompts_umt5

TASKS = ["pick up the cube", "open the drawer"]


@pytest.fixture(scope="module")
def umt5_dir(tmp_path_factory):
    """A pipeline-style folder: tokenizer/ (word-level, built offline) and text_encoder/ (random UMT5)."""
    return make_umt5_dir(tmp_path_factory.mktemp("umt5"))


def test_encode_prompts_umt5_matches_the_wan_pipeline_layout(umt5_dir):
    from transformers import AutoTokenizer, UMT5EncoderModel

    embeddings = encode_prompts_umt5(
        [*TASKS, "  open   the drawer "], umt5_dir, max_length=10, batch_size=2, padding="zeroed"
    )
    assert embeddings.shape == (3, 10, 16)
    # Zeros after each prompt (4 words + </s> = 5 tokens; 3 + 1 = 4), as Wan's pipeline pads.
    assert embeddings[0, :5].abs().sum(-1).gt(0).all() and embeddings[0, 5:].abs().sum() == 0
    assert embeddings[1, :4].abs().sum(-1).gt(0).all() and embeddings[1, 4:].abs().sum() == 0
    torch.testing.assert_close(embeddings[2], embeddings[1])  # whitespace cleaned like the pipeline

    tokenizer = AutoTokenizer.from_pretrained(umt5_dir / "tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(umt5_dir / "text_encoder").eval()
    tokens = tokenizer(TASKS[:1], padding="max_length", max_length=10, return_tensors="pt")
    with torch.no_grad():
        direct = encoder(tokens.input_ids, tokens.attention_mask).last_hidden_state
    torch.testing.assert_close(embeddings[0, :5], direct[0, :5])


def test_kept_padding_is_the_default_and_keeps_the_encoder_output_everywhere(umt5_dir):
    """The authors' release feeds the model UMT5's whole padded sequence (its T5 returns all 512 positions):
    "kept", the default, is the encoder's output at every position; "zeroed" differs only past the prompt."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    kept = encode_prompts_umt5(TASKS, umt5_dir, max_length=10)
    zeroed = encode_prompts_umt5(TASKS, umt5_dir, max_length=10, padding="zeroed")
    tokenizer = AutoTokenizer.from_pretrained(umt5_dir / "tokenizer")
    encoder = UMT5EncoderModel.from_pretrained(umt5_dir / "text_encoder").eval()
    tokens = tokenizer(TASKS, padding="max_length", max_length=10, return_tensors="pt")
    with torch.no_grad():
        direct = encoder(tokens.input_ids, tokens.attention_mask).last_hidden_state
    torch.testing.assert_close(kept, direct)
    assert kept[0, 5:].abs().sum() > 0 and kept[1, 4:].abs().sum() > 0  # the padded positions are not zero
    torch.testing.assert_close(zeroed[0, :5], kept[0, :5])
    with pytest.raises(XWAMError, match="text padding 'none'"):
        encode_prompts_umt5(TASKS, umt5_dir, max_length=10, padding="none")


def test_padding_is_recorded_in_the_cache_and_the_checkpoint_and_old_ones_read_as_zeroed(umt5_dir, tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    from xwam_core.checkpoint import load_text

    text = PrecomputedText.from_prompts(TASKS, umt5_dir, max_length=10)
    assert text.padding == "kept"
    text.save(tmp_path / "kept.safetensors")
    assert PrecomputedText.load(tmp_path / "kept.safetensors").padding == "kept"
    zeroed = PrecomputedText.from_prompts(TASKS, umt5_dir, max_length=10, padding="zeroed")
    zeroed.save(tmp_path / "zeroed.safetensors")
    assert PrecomputedText.load(tmp_path / "zeroed.safetensors").padding == "zeroed"
    # a cache written before padding was recorded (no metadata key) holds what xwam wrote then: zeroed
    save_file(
        load_file(tmp_path / "kept.safetensors"),
        tmp_path / "old.safetensors",
        metadata={"tasks": json.dumps(TASKS)},
    )
    assert PrecomputedText.load(tmp_path / "old.safetensors").padding == "zeroed"

    # a checkpoint's text.json: written by write_policy_parts, read back by load_text; absent -> zeroed
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file({"table": text.table().contiguous()}, folder / "text.safetensors")
    meta = {"kind": "precomputed", "tasks": TASKS, "seq_len": 10, "padding": "kept"}
    (folder / "text.json").write_text(json.dumps(meta))
    assert load_text(folder, 16).padding == "kept"
    del meta["padding"]
    (folder / "text.json").write_text(json.dumps(meta))
    assert load_text(folder, 16).padding == "zeroed"
    (folder / "text.json").write_text(json.dumps({**meta, "padding": "odd"}))
    with pytest.raises(XWAMError, match="padding 'odd'"):
        load_text(folder, 16)


def test_finetune_refuses_a_text_cache_whose_padding_differs_from_the_init_checkpoint(umt5_dir, tmp_path):
    from types import SimpleNamespace

    from xwam_core.factory import build_text
    from xwam_core.recipe import ModelConfig

    PrecomputedText.from_prompts(TASKS, umt5_dir, max_length=10, padding="zeroed").save(
        tmp_path / "c.safetensors"
    )
    cfg = ModelConfig(text="umt5", text_cache=str(tmp_path / "c.safetensors"))
    layout = SimpleNamespace(tasks=list(TASKS))
    assert build_text(cfg, layout, 16, init_padding="zeroed").padding == "zeroed"  # type: ignore[arg-type]
    assert build_text(cfg, layout, 16).padding == "zeroed"  # type: ignore[arg-type]  # no init: no constraint
    with pytest.raises(XWAMError, match="padding 'zeroed', but the --init checkpoint's model was trained on"):
        build_text(cfg, layout, 16, init_padding="kept")  # type: ignore[arg-type]


def test_precomputed_text_round_trips_and_selects_rows(umt5_dir, tmp_path):
    text = PrecomputedText.from_prompts(TASKS, umt5_dir, max_length=10)
    assert (text.num_tasks, text.seq_len, text.text_dim) == (2, 10, 16)
    assert len(list(text.parameters())) == 0 and text.state_dict() == {}  # frozen, never saved with a model
    text.save(tmp_path / "text.safetensors")
    again = PrecomputedText.load(tmp_path / "text.safetensors")
    assert again.tasks == TASKS and torch.equal(again.table(), text.table())

    out = again(torch.tensor([1, 0, 1]), drop=torch.tensor([False, False, True]))
    assert out.shape == (3, 10, 16)
    assert torch.equal(out[0], text.table()[1]) and torch.equal(out[1], text.table()[0])
    assert torch.equal(out[2], again.empty()[0])
    with pytest.raises(XWAMError, match="task index 2 out of range"):
        again(torch.tensor([2]))
    with pytest.raises(XWAMError, match="no such text-embedding cache"):
        PrecomputedText.load(tmp_path / "missing.safetensors")


def test_task_embedding_text_is_learned():
    text = TaskEmbeddingText(num_tasks=3, text_dim=8, seq_len=4)
    out = text(torch.tensor([0, 2]), drop=torch.tensor([False, True]))
    assert out.shape == (2, 4, 8)
    assert torch.equal(out[1], text.empty()[0])
    out.sum().backward()
    assert text.embedding.grad[[0, 3]].abs().sum() > 0 and text.embedding.grad[[1, 2]].abs().sum() == 0
    with pytest.raises(XWAMError, match="out of range"):
        text(torch.tensor([-1]))


def test_encode_prompts_umt5_bad_folder(tmp_path):
    with pytest.raises(XWAMError, match="UMT5"):
        encode_prompts_umt5(["x"], tmp_path)


def test_encode_prompts_umt5_without_transformers_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now raises ImportError
    with pytest.raises(XWAMError, match=r"need transformers: pip install 'xwam\[train\]'"):
        encode_prompts_umt5(["x"], "any/hub-id")


def test_a_umt5_cache_in_another_task_order_gives_each_task_its_own_row(tmp_path):
    """The model is fed the store's task indices: build_text reorders the cache's rows by task name (a cache
    written for other tasks or in another order used to give tasks the wrong embedding), and a
    checkpoint saves exactly those rows."""
    from types import SimpleNamespace

    import torch

    from xwam_core.factory import build_text
    from xwam_core.recipe import ModelConfig

    cache_tasks = ["push", "extra", "reach"]
    table = torch.arange(3 * 2 * 4, dtype=torch.float32).reshape(3, 2, 4)
    PrecomputedText(table, torch.zeros(2, 4), cache_tasks).save(tmp_path / "cache.safetensors")
    layout = SimpleNamespace(tasks=["reach", "push"])  # the store's order
    cfg = ModelConfig(text="umt5", text_cache=str(tmp_path / "cache.safetensors"))
    text = build_text(cfg, layout, 4)  # type: ignore[arg-type]
    assert text.tasks == ["reach", "push"] and text.num_tasks == 2
    assert torch.equal(text(torch.tensor([0, 1])), table[[2, 0]])
    assert torch.equal(text.empty(1)[0], torch.zeros(2, 4))
