"""What a decoder is asked to do: the decoding options and their validation, without torch.

Torch-free on purpose: the settings (`app/settings.py`) take their defaults from `DecodeConfig` and
validate command-line flags and config files before anything heavy is imported, so a bad flag
fails in a blink with one line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from triforce_chat.decoding.loops import LoopRule

# the sampling settings a model may recommend (Hugging Face generation_config.json, a catalogue)
MODEL_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")


def parse_budget(budget: str | int | float) -> tuple[int, float]:
    """'4096' -> (4096 tokens, 0.0); '0.1' or '10%' -> (0, 0.1 of the context)."""
    text = str(budget).strip()
    try:
        if text.endswith("%"):
            frac = float(text[:-1]) / 100
        else:
            value = float(text)
            if value >= 1:
                if value != int(value):
                    raise ValueError
                return int(value), 0.0
            frac = value
    except (ValueError, OverflowError):  # OverflowError: "inf" is a float but no token count
        raise ValueError(
            f"budget must be a token count (e.g. 4096) or a fraction of the context (e.g. 0.1 or 10%): {budget}"
        ) from None
    if not 0 < frac < 1:
        raise ValueError(f"budget fraction must be between 0 and 1: {budget}")
    return 0, frac


# the bottom drafters that are lookups over the context (no model): the suffix automaton (default) and
# the older n-gram index, kept to compare with; any other `draft` is a draft model
LOOKUPS = ("suffix", "ngram")
MAX_CHUNK = 4096  # a retrieval chunk longer than this selects nothing useful from any context


@dataclass
class DecodeConfig:
    level: int = 2
    draft: str = "suffix"
    budget: str = "4096"
    chunk_size: int = 8
    gamma_mid: int = 6
    gamma_low: int = 4
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0  # 1.0: off
    repetition_window: int = 64  # previous tokens the penalty reads (llama.cpp's repeat_last_n); 0: all
    seed: int | None = None
    max_new_tokens: int = 512
    adaptive: bool = True
    tree: bool = True  # the route may verify a branching match's two ways in one window (decoding/tree.py)
    # the middle level's and a draft model's logits over the context's tokens and the most common ones,
    # not the whole vocabulary (decoding/draft_head.py); False: their full heads, as before 5 December 2026
    restrict_draft_heads: bool = True
    truncate: bool = False
    prefill_chunk: int = 512
    stop_on_repetition: bool = True  # stop an answer that ends in a loop (see decoding/loops.py)
    loop_repeats: int = LoopRule.min_repeats
    loop_min_tokens: int = LoopRule.min_tokens
    loop_max_span: int = LoopRule.max_span
    # the sources of an answer (decoding/sources.py): the attention read at most every `sources_every`
    # answer tokens (0: no sources), the best `sources_top` passages kept
    sources_every: int = 4
    sources_top: int = 3

    def loop_rule(self) -> LoopRule | None:
        """The repetition stop, or None when it is off."""
        if not self.stop_on_repetition:
            return None
        return LoopRule(self.loop_repeats, self.loop_min_tokens, self.loop_max_span)

    def validate(self) -> None:
        """Raise ValueError with a one-line message for the first invalid value."""
        if self.level not in (0, 1, 2):
            raise ValueError(f"level must be 0, 1 or 2, not {self.level}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max-new-tokens must be a positive number, not {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top-p must be in (0, 1], not {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top-k must be >= 0 (0 is off), not {self.top_k}")
        if not 0 < self.repetition_penalty <= 10:
            raise ValueError(f"repetition-penalty must be in (0, 10] (1 is off), not {self.repetition_penalty}")
        if self.repetition_window < 0:
            raise ValueError(f"repetition-window must be >= 0 (0 is the whole context), not {self.repetition_window}")
        LoopRule(self.loop_repeats, self.loop_min_tokens, self.loop_max_span).validate()
        if not 1 <= self.chunk_size <= MAX_CHUNK:
            raise ValueError(f"chunk-size must be between 1 and {MAX_CHUNK}, not {self.chunk_size}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ValueError(f"seed must fit in 64 bits, not {self.seed}")
        if not 1 <= self.gamma_mid <= 64:
            raise ValueError(f"gamma-mid must be between 1 and 64, not {self.gamma_mid}")
        if not 1 <= self.gamma_low <= 64:
            raise ValueError(f"gamma-low must be between 1 and 64, not {self.gamma_low}")
        tokens, _ = parse_budget(self.budget)
        if tokens and tokens < 2 * self.chunk_size:
            raise ValueError(f"budget must be at least two chunks ({2 * self.chunk_size} tokens), not {tokens}")
        if not self.draft:
            raise ValueError("draft must be 'suffix', 'ngram' or a model")
        if self.sources_every < 0 or self.sources_top < 1:
            raise ValueError("sources: the reading interval must be >= 0 (0 is off) and the passages kept >= 1")


def generation_defaults(config: dict[str, Any]) -> dict[str, float | int]:
    """A model's recommended sampling settings from its Hugging Face generation config (the parsed
    generation_config.json): temperature, top_p, top_k, repetition_penalty, values that DecodeConfig
    accepts only. Like transformers, the sampling ones count only with `do_sample: true` (without
    it transformers decodes greedily); the repetition penalty applies either way."""
    out: dict[str, float | int] = {}
    sample = config.get("do_sample") is True
    for key in MODEL_DEFAULT_KEYS:
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if key != "repetition_penalty" and not sample:
            continue
        value = int(value) if key == "top_k" else float(value)
        try:
            DecodeConfig(**{key: value}).validate()
        except ValueError:
            continue
        out[key] = value
    return out


def drafter_label(draft: str) -> str:
    """How the chain and the panels name the bottom drafter of a `--draft` setting: a draft model
    drafts behind the suffix lookup (drafters.LookupFirstDrafter), so both are named."""
    return draft if draft in LOOKUPS else f"suffix+{draft}"


def chain_label(level: int, drafter: str, budget: str) -> str:
    """The decoding chain of a level, e.g. 'suffix -> retrieval(4096) -> target' (budget: the setting's
    text, a token count or a fraction). The one place the chain's name is made: the session names
    the chain an answer ran, the UI the chain the next answer will run, and the two are compared."""
    text = str(budget).strip()
    try:
        value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
        shown = str(int(value)) if value >= 1 else f"{value:.0%}"
    except ValueError:
        shown = text
    parts = {0: ["target"], 1: [f"retrieval({shown})", "target"], 2: [drafter, f"retrieval({shown})", "target"]}
    return " -> ".join(parts[level])
