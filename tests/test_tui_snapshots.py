"""Snapshots of the main screen (both themes, visualisation on and off) from recorded decoder data.

No model and no timing: recorded RoundEvents, stats and cache figures are fed into the widgets.
Update with `pytest tests/test_tui_snapshots.py --snapshot-update` and review the SVGs.
"""

from __future__ import annotations

import pytest

from triforce_chat.app.settings import Settings
from triforce_chat.app.ui.app import TriforceApp
from triforce_chat.app.ui.widgets import (
    AnswerMessage,
    ChatInput,
    StatsPanel,
    UserMessage,
    render_cache,
    render_documents,
)
from triforce_chat.decoding.events import CacheFigures, LowRound, RoundEvent

VOCAB = {
    1: "The",
    2: " ferry",
    3: " leaves",
    4: " island",
    5: " 3",
    6: " at",
    7: " 4",
    8: " o",
    9: "'clock",
    10: ",",
    11: " after",
    12: " the",
    13: " keeper",
    14: " logs",
    15: " weather",
    16: ".",
    17: " dawn",
    18: " every",
    19: " morning",
    20: "\n",
}


def decode(tok: int) -> str:
    return VOCAB.get(tok, "?")


def recorded_events() -> list[RoundEvent]:
    def ev(i, tokens, origins, mid_proposed=(), mid_accepted=0, low_rounds=(), kind="bonus"):
        return RoundEvent(
            index=i,
            tokens=list(tokens),
            origins=list(origins),
            text="".join(decode(t) for t in tokens),
            mid_proposed=list(mid_proposed),
            mid_accepted=mid_accepted,
            low_rounds=list(low_rounds),
            final_kind=kind,
        )

    return [
        ev(0, [1], ["target"], kind="step"),
        ev(
            1,
            [2, 3, 4, 5, 6],
            ["low", "low", "mid", "low", "target"],
            [2, 3, 4, 5],
            4,
            [LowRound([2, 3, 9], 2, 4, match=12, branches=1), LowRound([5, 11], 1, 6, match=2, branches=3)],
        ),
        ev(
            2,
            [7, 8, 9, 10],
            ["mid", "low", "low", "target"],
            [7, 8, 9, 12, 13],
            3,
            [LowRound([8, 9, 12, 13], 4, 16)],
            kind="correction",
        ),
        ev(
            3,
            [11, 12, 13, 14],
            ["low", "low", "low", "target"],
            [11, 12, 13, 15],
            3,
            [LowRound([11, 12, 13, 15], 3, 14)],
            kind="correction",
        ),
        ev(
            4,
            [12, 15, 6, 17, 16],
            ["mid", "mid", "low", "low", "target"],
            [12, 15, 6, 17],
            4,
            [LowRound([18, 19], 0, 12), LowRound([6, 17], 2, 16)],
        ),
    ]


STATS = {
    "level": 2,
    "chain": "suffix -> retrieval(4096) -> target",
    "gamma_mid": 6,
    "gamma_low": 4,
    "prefill_tokens": 12,
    "prefill_s": 0.05,
    "new_tokens": 19,
    "decode_s": 0.5,
    "tokens_per_s": 38.0,
    "ms_per_token": 26.3,
    "rounds": 5,
    "acceptance": {"mid": 0.8235, "low": 0.6667},
    "mean_accepted_length": 3.8,
    "lookup": {"proposals": 6, "mean_match": 7.5, "unique_share": 0.8333},
    "position_histogram": {"mid": [1.0, 1.0, 1.0, 0.75, 0.0], "low": [0.83, 0.67, 0.5, 0.25]},
    "level0_step_ms": 52.0,
    "speedup_vs_level0": 1.98,
    "origin_counts": {"low": 10, "mid": 4, "target": 5},
    "timings_s": {},
    "stop_reason": "eos",
}
RATES = [19.0, 41.5, 36.2, 44.8, 39.9, 25.0, 47.3, 38.0]
FIGURES = CacheFigures(
    full_kv_tokens=6254,
    full_kv_bytes=6254 * 30 * 2 * 3 * 64 * 4,
    full_kv_allocated_bytes=0,
    context_limit=8192,
    retrieval_budget_tokens=4096,
    retrieval_budget_fraction=4096 / 6254,
    retrieval_chunk_size=8,
    retrieval_chunks_selected=508,
    retrieval_recent_tokens=32,
    retrieval_rebuilds=1,
    drafter="suffix",
    suffix_states=11873,
    process_rss_bytes=812 * 1024 * 1024,
)


class RecordedApp(TriforceApp):
    """The real app and screen, fed recorded data instead of loading a model."""

    def __init__(self, theme: str, viz: bool) -> None:
        super().__init__(Settings(theme=theme, history=False))
        self._viz_on = viz
        self.fed = False

    def start(self) -> None:
        self.sub_title = "HuggingFaceTB/SmolLM2-135M-Instruct · context 8,192"
        self.query_one("#loadbar").display = False
        # A blinking cursor is drawn or not depending on when the picture is taken.
        self.query_one(ChatInput).cursor_blink = False
        self.call_later(self._feed)

    async def _feed(self) -> None:
        self.query_one("#welcome").display = False
        transcript = self.query_one("#transcript")
        await transcript.mount(UserMessage("When does the ferry leave island 3?", ["lighthouse.txt"]))
        answer = AnswerMessage(decode)
        self.answers.append(answer)
        await transcript.mount(answer)
        await answer.add_events(recorded_events())
        await answer.finish("19 tokens · 38.0 tok/s · level 2 · eos")
        self.query_one("#documents").update(render_documents([("lighthouse.txt", 6198)], 6254, 8192))
        self.query_one("#stats", StatsPanel).show(STATS, RATES)
        self.query_one("#cache").update(render_cache(FIGURES))
        if self._viz_on:
            self.action_toggle_viz()
        self.clear_notifications()
        self.fed = True


async def _settle(pilot) -> None:
    """Wait for the recorded feed itself, not a fixed time: on a loaded machine the feed can
    finish after any fixed pause, and its toast would then be in the picture."""
    for _ in range(400):
        if pilot.app.fed:
            break
        await pilot.pause(0.05)
    assert pilot.app.fed, "the recorded feed did not finish in 20 s"
    await pilot.wait_for_scheduled_animations()
    pilot.app.clear_notifications()
    await pilot.pause(0.1)


@pytest.mark.parametrize(
    ("theme", "viz"), [("triforce-dark", True), ("triforce-light", True), ("triforce-dark", False)]
)
def test_main_screen(snap_compare, theme, viz):
    assert snap_compare(RecordedApp(theme, viz), terminal_size=(150, 44), run_before=_settle)


def test_direct_round_shows_the_bottom_drafts_verified_by_the_target():
    """Level 2 may send the bottom drafter's proposal straight to the target (route "direct"):
    the strip must show those drafts, not a plain step."""
    from triforce_chat.app.ui.widgets import render_round, token_label

    ev = RoundEvent(
        index=7, tokens=[2, 3, 14], origins=["low", "low", "target"], text="", route="direct",
        low_rounds=[LowRound([2, 3, 9], 2, 14, match=5, branches=2)], final_kind="correction",
    )
    text = render_round(ev, decode).plain
    assert text.startswith("#7  low")
    a, b, c, d = (token_label(decode(t)) for t in (2, 3, 9, 14))
    assert f"✓{a} ✓{b} ✗{c} → {d}" in text
    assert "correction, target-verified" in text and "2/3  match 5 · 2 ways" in text  # the lookup's match, 2 branches
    from triforce_chat.app.ui.widgets import Pending, render_stats
    from triforce_chat.decoding.stats import Stats

    stats = Stats(level=2)
    stats.add(ev)
    lookup = stats.to_dict()["lookup"]
    assert lookup == {"proposals": 1, "mean_match": 5.0, "unique_share": 0.0}
    ngram = Stats(level=2)  # an n-gram index does not know the branching: no share is made up
    ngram.add(RoundEvent(index=0, tokens=[2, 3], origins=["low", "target"], text="", route="direct",
                         low_rounds=[LowRound([2, 7], 1, 3, match=3, branches=0)]))
    assert ngram.lookup["unique_share"] is None
    panel = render_stats(ngram.to_dict(), Pending(2, "ngram", "4096", 6, 4)).plain
    assert "match 3.0 tok" in panel and "one way" not in panel
    step = RoundEvent(index=8, tokens=[5], origins=["target"], text="", route="step")
    assert "step" in render_round(step, decode).plain


def test_a_tree_round_shows_both_ways_and_the_panel_counts_trees():
    """A tree round (route "tree") shows the lookup's proposal and the match's other way, one line
    each, the target's token after the way it kept; the Decoding panel counts trees and second ways."""
    from triforce_chat.app.ui.widgets import Pending, render_round, render_stats, token_label
    from triforce_chat.decoding.stats import Stats

    ev = RoundEvent(
        index=3, tokens=[4, 6, 14], origins=["low", "low", "target"], text="", route="tree", tree_width=2,
        tree_branch=1, final_kind="correction",
        low_rounds=[LowRound([2, 3], 0, 14, match=4, branches=3), LowRound([4, 6, 9], 2, 14)],
    )
    first, second = render_round(ev, decode).plain.split("\n")
    a, b, c, d, e, f = (token_label(decode(t)) for t in (2, 3, 4, 6, 9, 14))
    assert first.startswith("#3  tree") and f"✗{a} ·{b}" in first and "→" not in first
    assert "match 4 · 3 ways" in first
    assert f"✓{c} ✓{d} ✗{e} → {f}" in second and "correction, target-verified" in second
    stats = Stats(level=2)
    stats.add(ev)
    assert stats.to_dict()["trees"] == {"rounds": 1, "second_way_kept": 1}
    assert stats.low_proposed == 5 and stats.low_accepted == 2  # both ways were tried
    assert stats.lookup_proposals == 1  # one match behind both
    panel = render_stats(stats.to_dict(), Pending(2, "suffix", "4096", 6, 4)).plain
    assert "Lookup 1 drafts · trees 1×2, 2nd 1" in panel  # trees, their width, the second way kept
    # the first way's first token kept: the second way was never tried, and is not counted as rejected
    ev = RoundEvent(
        index=4, tokens=[2, 3, 14], origins=["low", "low", "target"], text="", route="tree", tree_width=2,
        tree_branch=0, final_kind="bonus",
        low_rounds=[LowRound([2, 3], 2, 14, match=4, branches=3), LowRound([4, 6], 0, 14, tried=False)],
    )
    first, second = render_round(ev, decode).plain.split("\n")
    assert f"✓{a} ✓{b} → {f}" in first and f"·{c} ·{d}" in second and "not tried" in second
    stats.add(ev)
    assert stats.low_proposed == 7 and stats.low_accepted == 4


def test_a_level_0_answer_is_not_compared_with_level_0():
    """A level-0 answer is the reference: the panel showed "x0.65 vs level 0" for one (a short answer
    against the step timed before it). A speculative answer keeps its ratio."""
    from triforce_chat.app.ui.widgets import Pending, render_stats
    from triforce_chat.decoding.stats import Stats

    ev = RoundEvent(index=0, tokens=[4], origins=["target"], text="", route="step", final_kind="step", wall_s=0.03)
    plain = Stats(level=0, level0_step_s=0.02)
    plain.add(ev)
    assert plain.speedup_vs_level0 is None and plain.to_dict()["speedup_vs_level0"] is None
    panel = render_stats(plain.to_dict(), Pending(0, "suffix", "4096", 6, 4)).plain
    assert "(level 0)" in panel and "vs level 0" not in panel
    spec = Stats(level=2, level0_step_s=0.02)
    spec.add(RoundEvent(index=0, tokens=[4, 5, 6], origins=["low", "low", "target"], text="", route="direct",
                        final_kind="bonus", low_rounds=[LowRound([4, 5], 2, 6)], wall_s=0.03))
    assert spec.speedup_vs_level0 == pytest.approx(2.0)  # 3 tokens in the time of 1.5 steps
    panel = render_stats(spec.to_dict(), Pending(2, "suffix", "4096", 6, 4)).plain
    assert "×2.00 vs level 0" in panel


def test_cache_panel_names_both_bottoms_of_a_lookup_first_drafter():
    """suffix+model: the panel shows the lookup's index, the model's window and who drafted."""
    import dataclasses

    from triforce_chat.app.ui.widgets import render_cache

    fig = dataclasses.replace(
        FIGURES, drafter="suffix+qwen2.5-coder-0.5b", drafter_sink_tokens=4, drafter_recent_tokens=1024,
        drafter_lookup_rounds=31, drafter_model_rounds=12, drafter_weight_bytes=400 << 20,
        drafter_cache_bytes=12 << 20,
    )
    text = render_cache(fig).plain
    assert "Drafter suffix+qwen2.5-coder-0.5b" in text
    assert "lookup 11,873 states" in text and "model sink 4 + recent 1,024" in text
    assert "drafted by lookup 31, model 12" in text
    assert "Drafter suffix: 11,873 states" in render_cache(FIGURES).plain
    ngram = dataclasses.replace(FIGURES, drafter="ngram", suffix_states=0, ngram_index_entries=5873)
    assert "Drafter ngram: index 5,873 entries" in render_cache(ngram).plain


def test_cache_panel_shows_the_middle_level_s_head_only_where_it_is_restricted():
    import dataclasses

    from triforce_chat.app.ui.widgets import render_cache

    assert "head" not in render_cache(FIGURES).plain
    text = render_cache(dataclasses.replace(FIGURES, mid_head_tokens=17_408, vocab_size=49_152)).plain
    assert " head 17,408 of 49,152 tokens" in text.split("\n")


def test_cache_panel_shows_the_prepared_blocks_only_where_the_cache_keeps_them():
    import dataclasses

    from triforce_chat.app.ui.widgets import render_cache

    assert "blocks" not in render_cache(dataclasses.replace(FIGURES, attention_blocks_bytes=0)).plain
    for kind in ("bf16", "int8"):
        figures = dataclasses.replace(FIGURES, attention_blocks_bytes=37 << 20, attention_blocks_kind=kind)
        text = render_cache(figures).plain
        assert f"+ {kind} blocks 37.0 MiB" in text
