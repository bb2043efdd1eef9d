"""The middle level's head over part of the vocabulary (decoding/draft_head.py): the rows it keeps
give the full head's logits bit for bit, in either activation mode and through each way its copy
grows; every other token gets -inf. (Its losslessness inside the decoder: test_speculative.py.)"""

from __future__ import annotations

import pytest
import torch

from gguf_models import load, resident_pages, write_gguf
from triforce_chat.decoding.draft_head import ROWS_MULTIPLE, DraftHead

VOCAB = 300


@pytest.fixture(scope="module")
def qwen2_model(tmp_path_factory):
    """A quantized Qwen2-layout model whose output head is Q8_0 blocks, as the default model's is."""
    path = write_gguf(tmp_path_factory.mktemp("head") / "m.gguf", "qwen2", vocab=VOCAB, qtype="Q5_0", seed=3,
                      qtypes={"output": "Q8_0"})
    return load(path)


def modes(model) -> list[str]:
    """The activation modes this machine can run the model in (int8 needs AVX2 or AVX512-VNNI)."""
    return ["fp32"] + ([] if model.int8_available() else ["int8"])


def assert_is_the_full_head_restricted(model, head: DraftHead, rows: int = 5) -> None:
    x = model.norm(torch.randn(rows, model.args.dim, generator=torch.Generator().manual_seed(rows)))
    full, got = model.output(x).float(), head.logits(x)
    kept = head.member
    assert got.shape == full.shape
    assert torch.equal(got[:, kept], full[:, kept])
    assert bool((got[:, ~kept] == -torch.inf).all())


@pytest.mark.parametrize("mode", ["fp32", "int8"])
def test_kept_rows_are_the_full_head_s_bit_for_bit_as_the_set_grows(qwen2_model, mode, monkeypatch):
    model = qwen2_model
    if mode not in modes(model):
        pytest.skip(f"this machine cannot run the int8 mode: {model.int8_available()}")
    model.set_activations(mode)
    head = DraftHead(model.output, common=10, always=[VOCAB - 1])
    assert head.size == 11
    assert head.cover([40, 41, 40, 200])
    assert_is_the_full_head_restricted(model, head)  # the first copy
    if mode == "int8":  # padded with the next ids outside the set to whole tiles of rows
        assert head.size == ROWS_MULTIPLE and bool(head.member[10:12].all()) and not head.member[12]
    else:
        assert head.size == 14 and head.member.nonzero().squeeze(1).tolist() == [*range(10), 40, 41, 200, VOCAB - 1]
    first = head.size
    assert head.cover([250, 251])  # a second, small copy next to the first
    assert_is_the_full_head_restricted(model, head)
    assert head.size > first and bool(head.member[[250, 251]].all())
    monkeypatch.setattr(DraftHead, "FOLD_ROWS", 0)  # past it, the two copies become one
    assert head.cover([120])
    assert_is_the_full_head_restricted(model, head)
    assert head.ids.numel() == head.size == int(head.member.sum())


def test_a_change_of_activation_mode_copies_the_rows_again(qwen2_model):
    model = qwen2_model
    if "int8" not in modes(model):
        pytest.skip(f"this machine cannot run the int8 mode: {model.int8_available()}")
    model.set_activations("int8")
    head = DraftHead(model.output, common=32)
    assert_is_the_full_head_restricted(model, head)
    model.set_activations("fp32")  # the int8 and fp32 logits differ: a stale copy would show it
    assert_is_the_full_head_restricted(model, head)


def test_cover_counts_only_new_ids_of_the_vocabulary(qwen2_model):
    head = DraftHead(qwen2_model.output, common=4)
    assert not head.cover([0, 3, -1, VOCAB, VOCAB + 7])  # known, or not tokens at all
    assert not head.cover([])
    assert head.cover(torch.tensor([[5, 5], [6, 2]]))
    assert head.size == 6 and not head.cover([6])
    assert head.nbytes == qwen2_model.output.nbytes * 6 // VOCAB
    with pytest.raises(ValueError, match="common tokens"):
        DraftHead(qwen2_model.output, common=-1)


def test_copying_rows_of_a_packed_head_leaves_none_of_the_file_s_pages_mapped(tmp_path):
    """In the int8 mode the full head multiplies a packed copy and the mapped file's pages under it were
    released (Linear.set_int8); gathering the draft head's rows faults them in again (with the
    kernel's readahead, ~120 MB for Qwen's head), so the copy releases them too."""
    vocab = 640  # whole tiles of 16 rows: packed
    model = load(write_gguf(tmp_path / "m.gguf", "qwen2", vocab=vocab, qtype="Q5_0", seed=4, qtypes={"output": "Q8_0"}))
    if "int8" not in modes(model):
        pytest.skip(f"this machine cannot run the int8 mode: {model.int8_available()}")
    model.set_activations("int8")
    part = model.output.parts[0]
    assert model.output.int8_types[0] > 1000 and resident_pages(part) == 0
    head = DraftHead(model.output, common=0)
    head.cover(range(0, vocab, 3))
    head.prepare()
    assert resident_pages(part) == 0
    assert_is_the_full_head_restricted(model, head)

