"""The repetition stop: the rule on token sequences (against a brute-force reference, and silent on
real documentation and code), then a model that loops for certain, stopped at the same token at
levels 0, 1 and 2, through the Session and in the chat app."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import QWEN_LIKE, save_looping_model, save_random_model
from test_speculative import Engine
from triforce_chat.decoding.config import DecodeConfig
from triforce_chat.decoding.loops import LoopDetector, LoopRule, find_loop
from triforce_chat.decoding.models.loading import load_model, load_weights_only
from triforce_chat.decoding.sampling import Sampler
from triforce_chat.decoding.session import Session


def brute_force_loop(tokens: list[int], rule: LoopRule) -> int | None:
    """First index at which some span of length s <= max_span ends the prefix min_repeats times
    back to back, over at least min_tokens tokens: checked from scratch at every index."""
    for i in range(len(tokens)):
        prefix = tokens[: i + 1]
        for s in range(1, rule.max_span + 1):
            need = max(rule.min_repeats * s, rule.min_tokens)
            if len(prefix) >= need and all(prefix[-k] == prefix[-k - s] for k in range(1, need - s + 1)):
                return i
    return None


# -- the rule -------------------------------------------------------------------------------------------
def test_a_repeated_sentence_stops_at_the_end_of_its_third_copy():
    sentence = list(range(100, 120))  # 20 tokens
    answer = list(range(10)) + sentence * 5
    assert find_loop(answer, LoopRule()) == 10 + 3 * 20 - 1


def test_short_spans_must_cover_the_token_floor():
    rule = LoopRule()  # 3 repeats, 48 tokens
    assert find_loop([1, 2] + [7] * 100, rule) == 2 + 48 - 1  # one token 48 times
    assert find_loop([1, 2, 3] + [8, 9] * 50, rule) == 3 + 48 - 1  # ", 0" 24 times
    assert find_loop([5] * 47, rule) is None


def test_ordinary_sequences_do_not_stop():
    rule = LoopRule()
    sentence = list(range(100, 140))
    assert find_loop(sentence + sentence + [1, 2, 3], rule) is None  # said twice is not a loop
    items = [t for i in range(60) for t in (500, 501 + i, 9)]  # "- item i\n": the numbers differ
    assert find_loop(items, rule) is None
    rng = random.Random(0)
    assert find_loop([rng.randrange(1000) for _ in range(5000)], rule) is None
    # a loop longer than max_span is out of sight
    assert find_loop(list(range(300)) * 4, LoopRule(max_span=256)) is None
    assert find_loop(list(range(300)) * 4, LoopRule(max_span=300)) == 3 * 300 - 1


@pytest.mark.parametrize("seed", range(6))
def test_detector_matches_the_brute_force_rule(seed):
    rng = random.Random(seed)
    for _ in range(40):
        rule = LoopRule(rng.randint(2, 4), rng.randint(2, 14), rng.randint(1, 8))
        tokens: list[int] = []
        while len(tokens) < 60:  # random stretches and planted repeats of random spans
            if rng.random() < 0.5:
                tokens += [rng.randrange(4) for _ in range(rng.randint(1, 6))]
            else:
                span = [rng.randrange(4) for _ in range(rng.randint(1, 9))]
                tokens += span * rng.randint(1, 5)
        assert find_loop(tokens, rule) == brute_force_loop(tokens, rule), (rule, tokens)


def test_rule_values_are_checked():
    for rule, words in [(LoopRule(min_repeats=1), "loop-repeats"), (LoopRule(min_tokens=1), "loop-min-tokens"),
                        (LoopRule(max_span=0), "loop-max-span")]:
        with pytest.raises(ValueError, match=words):
            LoopDetector(rule)
    assert DecodeConfig().loop_rule() == LoopRule() and DecodeConfig(stop_on_repetition=False).loop_rule() is None


def test_real_documentation_and_code_do_not_stop(default_model_dir):
    """Python's documentation (prose, code, tables) and a standard-library module, cut into
    512-token answers: the default rule never fires."""
    import inspect
    import pydoc_data.topics as topics
    import tokenize

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    names = sorted(topics.topics)[::8]
    texts = [topics.topics[k] for k in names] + [inspect.getsource(tokenize)]
    total = 0
    for text in texts:
        ids = tok(text, add_special_tokens=False).input_ids
        total += len(ids)
        for start in range(0, len(ids), 512):
            assert find_loop(ids[start : start + 512], LoopRule()) is None, tok.decode(ids[start : start + 512])
    assert total > 15_000


# -- a model that loops ------------------------------------------------------------------------------------
CHAIN = {10: 11, 11: 12, 12: 13, 13: 20, 20: 21, 21: 22, 22: 23, 23: 24, 24: 25, 25: 26, 26: 20}  # cycle of 7


@pytest.fixture(scope="module")
def looping_engine(tmp_path_factory):
    model = load_weights_only(save_looping_model(tmp_path_factory.mktemp("loop"), CHAIN))
    draft = load_weights_only(save_random_model(tmp_path_factory.mktemp("ld"), "llama", vocab_size=64, seed=3,
                                                num_hidden_layers=1))
    prompt = torch.randint(30, 60, (120,), generator=torch.Generator().manual_seed(0)).tolist() + [10]
    return Engine(model, prompt, budget=16, chunk=4, draft_model=draft)


def run_with_rule(engine: Engine, level: int, rule: LoopRule | None, drafter="ngram", n=72, sampler=None):
    engine.cache.truncate(len(engine.prompt) - 1)
    tokens, dec = engine.run(level, n, sampler or Sampler(0.0), drafter, gamma_mid=5, gamma_low=4,
                             adaptive=False, loop=rule)
    return tokens, dec


@pytest.mark.parametrize("rule", [LoopRule(), LoopRule(4, 12, 32), LoopRule(2, 9, 16)])
def test_every_level_stops_at_the_same_token(looping_engine, rule):
    engine = looping_engine
    free, free_dec = run_with_rule(engine, 0, None)
    assert free_dec.stop_reason == "max tokens" and len(free) == 72
    stop = find_loop(free, rule)
    assert stop is not None
    cuts_inside_a_round = 0
    for level, drafter in [(0, "ngram"), (1, "ngram"), (2, "ngram"), (2, "model")]:
        got, dec = run_with_rule(engine, level, rule, drafter)
        assert got == free[: stop + 1], (level, drafter)
        assert dec.stop_reason == "repetition"
        assert engine.cache.length == len(engine.prompt) + len(got) - 1
        # the same level without the rule decodes the same rounds; the stopping round was cut short
        # when the free run's round kept more tokens
        whole, free_level = run_with_rule(engine, level, None, drafter)
        assert whole == free
        k = len(dec.kept) - 1
        assert dec.kept[:k] == free_level.kept[:k]
        last, unruled = dec.kept[k], free_level.kept[k]
        assert unruled[: len(last)] == last
        cuts_inside_a_round += len(last) < len(unruled)
    assert cuts_inside_a_round, "no level stopped in the middle of a multi-token round"


def test_levels_stop_at_the_same_token_when_sampling(looping_engine):
    """The looping model is all but deterministic when sampling too (its successor leads by 44
    logits): every level, each with its own random stream, stops at the same token."""
    engine = looping_engine
    rule = LoopRule(3, 12, 32)
    outs = []
    for level, drafter in [(0, "ngram"), (1, "ngram"), (2, "ngram"), (2, "model")]:
        got, dec = run_with_rule(engine, level, rule, drafter, sampler=Sampler(1.0, seed=level))
        assert dec.stop_reason == "repetition"
        outs.append(got)
    assert outs[0] == outs[1] == outs[2] == outs[3] and len(outs[0]) == find_loop(outs[0], rule) + 1


def test_the_rule_does_not_fire_on_a_model_that_does_not_loop(looping_engine):
    """The random draft model of the fixture, decoded as a target, wanders without looping."""
    engine = looping_engine
    other = Engine(engine.drafters["model"].model, engine.prompt, budget=16, chunk=4)
    free, _ = other.run(0, 80, Sampler(0.0))
    assert find_loop(free, LoopRule()) is None
    got, dec = other.run(2, 80, Sampler(0.0), loop=LoopRule())
    assert got == free and dec.stop_reason == "max tokens"


# -- through the Session and the app -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def looping_model(looping_chat_model_dir):
    return load_model(str(looping_chat_model_dir), dtype=torch.float32)


def test_loaded_model_carries_its_generation_defaults(looping_model, tiny_model):
    assert looping_model.generation_defaults == {k: v for k, v in QWEN_LIKE.items() if k != "do_sample"}
    assert tiny_model.generation_defaults == {}  # transformers' saved config recommends nothing


def test_session_stops_with_the_reason_and_the_setting_turns_it_off(looping_model):
    stopped = {}
    for level in (0, 1, 2):
        session = Session(looping_model, DecodeConfig(level=level, max_new_tokens=200, budget="16", chunk_size=4,
                                                      **{k: v for k, v in QWEN_LIKE.items() if k != "do_sample"}))
        list(session.generate("Say something."))
        assert session.stats.stop_reason == "repetition"
        stopped[level] = session.turns[-1].token_ids
    assert stopped[0] == stopped[1] == stopped[2]
    assert len(stopped[0]) == find_loop(stopped[0], LoopRule()) + 1 < 200
    session = Session(looping_model, DecodeConfig(level=2, max_new_tokens=200, stop_on_repetition=False))
    list(session.generate("Say something."))
    assert session.stats.stop_reason == "max tokens" and session.turns[-1].token_ids[: len(stopped[0])] == stopped[0]


async def test_app_shows_the_stop_and_uses_the_model_defaults(looping_model, tmp_path, monkeypatch):
    from test_tui import SIZE, ask, ready, text_of
    from triforce_chat.app.settings import Settings
    from triforce_chat.app.ui.app import TriforceApp
    from triforce_chat.app.ui.history import History

    monkeypatch.setenv("TRIFORCE_CHAT_DATA", str(tmp_path / "data"))
    settings = Settings().merged(max_new_tokens=200, top_k=5)  # a flag or the config file gave top_k
    app = TriforceApp(settings, [], model=looping_model, history=History(tmp_path / "data"))
    async with app.run_test(size=SIZE) as pilot:
        await ready(pilot)
        cfg = app.session.config
        assert (cfg.temperature, cfg.top_p, cfg.repetition_penalty, cfg.top_k) == (0.7, 0.8, 1.1, 5)
        answer = await ask(pilot, "Say something.")
        assert app.session.stats.stop_reason == "repetition"
        assert "stopped: repetition" in str(answer.query_one(".answer-meta").render())
        assert "stopped: repetition" in text_of(app, "#stats-body")
