"""What the decoder reports, round by round, and the aggregates computed from it.

The TUI, `ask --json` and `bench` all read these objects; numbers are computed here once.
Origins of kept tokens: "low" (proposed by the bottom drafter and accepted by both verifiers),
"mid" (drafted by the retrieval-cache target, accepted by the full target), "target" (produced by
the full target: a correction, a bonus token, or a plain level-0 step).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

ORIGINS = ("low", "mid", "target")


@dataclass
class LowRound:
    """One inner round at level 2: the bottom drafter proposed, the middle level verified."""

    proposed: list[int]
    accepted: int
    next_token: int  # the middle level's correction or bonus after the accepted prefix (or the target's)
    match: int = 0  # a lookup proposal: the length of the match it follows (0: a model's, or none)
    branches: int = 0  # ... and how many distinct tokens followed that match before (0: not known)
    tried: bool = True  # False: a tree's second way, never verified (the first way's first token was kept)


@dataclass
class RoundEvent:
    """One outer round: the middle level drafted, the full target verified (level 0: one step)."""

    index: int
    tokens: list[int]  # tokens kept this round, in order (accepted drafts then correction/bonus)
    origins: list[str]  # per kept token, one of ORIGINS
    text: str  # the decoded text these tokens add to the answer
    mid_proposed: list[int] = field(default_factory=list)  # the window the full target verified
    mid_accepted: int = 0
    low_rounds: list[LowRound] = field(default_factory=list)
    route: str = "step"  # "step": plain target step | "mid": middle window | "direct": bottom drafts to target
    # | "tree": two branches of bottom drafts to the target in one window (one LowRound each)
    tree_width: int = 0  # branches a tree round verified (0: not a tree)
    tree_branch: int = 0  # the branch the target kept (0: the lookup's proposal, 1: the other way)
    final_kind: str = "step"  # "step" (level 0) | "correction" | "bonus"
    timings: dict[str, float] = field(default_factory=dict)  # seconds spent in "low", "mid", "target"
    wall_s: float = 0.0
    gamma_mid: int = 0  # the window length chosen for this round (adaptive)
    gamma_low: int = 0
    # on the answer's last event: why it ended ("eos", "max tokens", "repetition", "stopped",
    # "context full"); "" on every other event
    stop_reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CacheFigures:
    full_kv_tokens: int = 0
    full_kv_bytes: int = 0
    full_kv_allocated_bytes: int = 0
    attention_blocks_bytes: int = 0  # the bf16 or int8 attention's prepared blocks (decoding/cache.py)
    attention_blocks_kind: str = ""  # "bf16" or "int8": which of the two the cache keeps
    attention_scratch_bytes: int = 0  # the exact kernel's scores, kept between steps
    context_limit: int = 0
    retrieval_budget_tokens: int = 0
    retrieval_budget_fraction: float = 0.0  # of the current context
    retrieval_chunk_size: int = 0
    retrieval_chunks_selected: int = 0
    retrieval_recent_tokens: int = 0
    retrieval_rebuilds: int = 0
    retrieval_buffer_bytes: int = 0  # the view's own copy: selected chunks + recent window + scratch
    mid_head_tokens: int = 0  # the middle level's head: tokens it covers (decoding/draft_head.py; 0: the full head)
    vocab_size: int = 0
    model: str = ""  # the target: its name, how its weights are held, their bytes, the KV dtype
    weights: str = ""
    weight_bytes: int = 0
    kv_dtype: str = ""
    kernels: str = ""  # e.g. "native avx512" or "PyTorch (no compiler)"
    drafter: str = "none"
    drafter_sink_tokens: int = 0
    drafter_recent_tokens: int = 0
    drafter_cache_bytes: int = 0  # a draft model's StreamingLLM cache (allocated)
    drafter_weight_bytes: int = 0
    ngram_index_entries: int = 0
    suffix_states: int = 0  # the suffix automaton's states (about twice the context's tokens)
    drafter_lookup_rounds: int = 0  # ngram+model: rounds the lookup drafted / the model drafted
    drafter_model_rounds: int = 0
    process_rss_bytes: int = 0
    memory_estimate_bytes: int = 0  # the memory guard's estimate: model and caches at the full context
    memory_available_bytes: int = 0  # what the process can still take (cgroup limit or MemAvailable)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def process_rss_bytes() -> int:
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # psutil missing or restricted: report nothing rather than fail
        return 0
