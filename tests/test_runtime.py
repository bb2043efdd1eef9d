"""app/runtime.py, the one way in: what opening a model does to the process besides loading it."""

from __future__ import annotations

import gc
import weakref

from triforce_chat.app import runtime
from triforce_chat.app.runtime import release_frozen, settle_heap  # the real ones (conftest stubs them)
from triforce_chat.app.settings import Settings


class Node:
    pass


def test_settle_heap_freezes_what_is_alive_and_collects_frozen_cycles_at_the_next_call():
    """Frozen objects are out of the full collector passes (the point: a pass over torch, transformers
    and Textual held the GIL for 130-190 ms in the middle of answers); a cycle frozen with them is not
    leaked for good, since the next call (the next model opened) unfreezes and collects first."""
    def tracked(obj: object) -> bool:  # in a generation the collector's passes walk (not frozen)
        return any(o is obj for o in gc.get_objects())

    try:
        node = Node()
        node.me = node  # a cycle: only the cyclic collector frees it
        ref = weakref.ref(node)
        kept = Node()  # alive throughout
        settle_heap()
        assert gc.get_freeze_count() > 0 and not tracked(kept)
        del node
        gc.collect()
        assert ref() is not None  # frozen: a full pass does not look at it
        release_frozen()  # what the next open_model does first
        # (not get_freeze_count() == 0: CPython 3.12 keeps its own immortal objects in the frozen generation)
        assert ref() is None and tracked(kept)
        fresh = Node()
        fresh.me = fresh
        fresh_ref = weakref.ref(fresh)
        del fresh
        gc.collect()
        assert fresh_ref() is None  # objects made after the freeze are collected as always
    finally:
        gc.unfreeze()


def test_opening_a_model_frees_what_an_earlier_one_froze_first_and_settles_the_heap_last(monkeypatch,
                                                                                         tiny_model_dir):
    """The order matters: bench-qa drops a model and opens the next; freed after the next one's load,
    the dropped one would sit next to it through its memory check (two models' peak)."""
    from triforce_chat.decoding.memory import guard

    calls = []
    check = guard.check_before_load
    monkeypatch.setattr(runtime, "release_frozen", lambda: calls.append("release"))
    monkeypatch.setattr(guard, "check_before_load", lambda *a, **k: calls.append("check") or check(*a, **k))
    monkeypatch.setattr(runtime, "settle_heap", lambda: calls.append("settle"))
    lm = runtime.open_model(Settings(model=str(tiny_model_dir), context=256, threads=1, device="cpu"))
    assert lm.model is not None and calls == ["release", "check", "settle"]


def test_more_threads_than_cores_is_said_once(tiny_model_dir):
    """`--threads 999` on a 2-core machine ran, slower than 2 threads, without a word."""
    import torch

    before = torch.get_num_threads()
    try:
        cores = runtime.usable_cores()
        many = runtime.open_model(Settings(model=str(tiny_model_dir), context=256, threads=cores + 1, device="cpu"))
        assert [n for n in many.notices if f"{cores + 1} threads on {cores} cores" in n]
        fitting = runtime.open_model(Settings(model=str(tiny_model_dir), context=256, threads=1, device="cpu"))
        assert not [n for n in fitting.notices if "threads on" in n]
    finally:
        torch.set_num_threads(before)
        gc.unfreeze()
