"""`triforce-chat bench`: the speculation levels side by side with transformers `generate`.

For every context length and prompt, each level decodes the same prompt greedily in a fresh
Session; the generated token ids must be identical across levels (the decoder is lossless, so any
difference is a bug: the command prints MISMATCH and exits 1). transformers `generate` runs on the
same prompt ids, weights and dtype, plain and with prompt lookup, as the baselines to beat.
`--hf-cache static` gives plain `generate` a preallocated StaticCache (SDPA over the whole cache
with a mask, the configuration kernel targets are stated against); prompt lookup always uses the
default DynamicCache, since assisted generation crops the cache on rejection.

How time is split (the same rule for every row, so ratios are fair):
- ours: prefill = syncing the cache with the prompt (all prompt tokens but the last), and at levels
  1-2 timing the target's windows at that depth where the session has not yet (`calibrate_s`, as the
  app does after a document's prefill); decode = the rest of the wall time of `Session.generate`,
  which produces every new token (the first one comes from feeding the last prompt token).
- transformers: a streamer timestamps every token handed out. Prefill = from calling `generate` to
  the first new token (one forward over the whole prompt); decode = from there to the return, over
  the tokens after the first. With prompt lookup the first hand-out may already carry accepted
  drafts; they are counted with the prefill, not the decode.
One untimed warm-up run per variant comes first, since the first call pays one-off set-up costs.
With --reuse-prefill (for very long contexts, where one prefill takes minutes) every run of a
context after its first continues the first one's Session after `new_chat()`: the document's
cache (and the drafters' state) kept, only the question prefilled.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from typing import Any

from triforce_chat.app.bench.common import (
    BenchError,
    Log,
    first_difference,
    fmt,
    load_average,
    machine_info,
    parse_int_list,
    ratio,
    timed_answer,
)

LEVEL_NAMES = {0: "level 0", 1: "level 1", 2: "level 2"}
HF_PLAIN, HF_LOOKUP = "HF generate", "HF prompt-lookup"
LOOKUP_TOKENS = 10
HF_CACHES = ("dynamic", "static")
GENERIC_QUESTIONS = (
    ("Quote the first paragraph of the document word for word.", "quote"),
    ("What is the document about? Answer in a few sentences.", "fact"),
    ("Quote the last paragraph of the document word for word.", "quote"),
)


@dataclass
class BenchSpec:
    contexts: list[int]
    levels: list[int]
    max_new_tokens: int = 128
    questions: int = 2
    doc: tuple[str, str] | None = None  # (name, text) instead of the generated report
    hf: bool = True
    hf_cache: str = "dynamic"  # plain generate's cache: "dynamic" (transformers' default) or "static"
    context: int | None = None  # --context: positions extended with YaRN (the baselines need it too)
    reuse_prefill: bool = False  # levels after the first continue the first one's Session (new_chat)
    store: Any = None  # --doc-cache: a DocumentStore; the first session of a context restores/saves there
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hf_cache not in HF_CACHES:
            raise BenchError(f"hf-cache must be one of {', '.join(HF_CACHES)}, not {self.hf_cache!r}")


@dataclass
class Prompt:
    context: int  # as requested; the real prompt length is measured when it runs
    index: int
    doc_name: str
    doc_text: str
    question: str
    kind: str


# -- prompts ----------------------------------------------------------------------------------------------
def fit_text(tokenizer, text: str, n_tokens: int) -> str:
    """The head of `text` in at most about `n_tokens` tokens, cut at a paragraph break when one is near."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) <= n_tokens:
        return text
    head = tokenizer.decode(ids[: max(1, n_tokens)])
    brk = head.rfind("\n\n")
    return (head[:brk] if brk > len(head) // 2 else head).rstrip() + "\n"


def make_prompts(lm, spec: BenchSpec) -> list[Prompt]:
    """Per context: the document cut so that template + document + question is about that many tokens,
    and `spec.questions` questions whose answers survived the cut."""
    from triforce_chat.app.bench.corpus import build_report, pick_questions
    from triforce_chat.decoding.session import DecodeConfig, Session

    counter = Session(lm, DecodeConfig(level=0))
    prompts: list[Prompt] = []
    for ctx in spec.contexts:
        if spec.doc is None:
            report = build_report(int(ctx * 1.2) + 200, spec.seed)
            name, source = "report.md", report.text
        else:
            name, source = spec.doc
        questions: list[tuple[str, str]] = []
        text = source
        budget = ctx
        for _ in range(3):  # the template's overhead depends a little on the cut: converge in a few steps
            text = fit_text(lm.tokenizer, source, budget)
            if spec.doc is None:
                picked = pick_questions(report.questions_in(text), spec.questions)
                questions = [(q.text, q.kind) for q in picked]
            else:
                questions = [GENERIC_QUESTIONS[i % len(GENERIC_QUESTIONS)] for i in range(spec.questions)]
            if not questions:
                raise BenchError(f"context {ctx} is too small to hold one section of the report")
            longest = max(_prompt_len(counter, name, text, q) for q, _ in questions)
            if longest <= ctx and (longest >= ctx - 64 or text == source):
                break
            budget += ctx - longest
        for i, (q, kind) in enumerate(questions):
            prompts.append(Prompt(ctx, i, name, text, q, kind))
    return prompts


def _prompt_len(session, name: str, text: str, question: str) -> int:
    session.pending_documents = []
    session.add_document(name, text)
    return len(session.prompt_ids(question))


# -- our levels -----------------------------------------------------------------------------------------
def run_level(
    lm, cfg, prompt: Prompt, level: int, max_new_tokens: int, session=None, store=None
) -> dict[str, Any]:
    """Decode `prompt` greedily at `level`; one result record. In a fresh Session unless one is given:
    then the answer it holds is dropped (new_chat) and the prompt's cache is kept, not prefilled again;
    `record["session"]` is the Session either way."""
    from triforce_chat.decoding.drafters import DrafterError
    from triforce_chat.decoding.session import ContextOverflow, DocumentError, Session

    # plain greedy to the token budget, as the transformers baselines decode (no penalty, no loop stop)
    cfg = dataclasses.replace(cfg, level=level, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0,
                              stop_on_repetition=False, max_new_tokens=max_new_tokens)
    try:
        if session is None:
            session = Session(lm, cfg, store=store)
            session.add_document(prompt.doc_name, prompt.doc_text)
        else:
            session.new_chat()
            session.set_level(level)
        ids, wall = timed_answer(session, prompt.question)
    except (ContextOverflow, DocumentError, DrafterError) as exc:
        raise BenchError(f"context {prompt.context}: {exc}") from None
    st = session.stats
    return {
        "variant": LEVEL_NAMES[level],
        "level": level,
        "token_ids": ids,
        "prompt_tokens": len(session.last_prompt_ids),
        "prompt_ids": session.last_prompt_ids,
        "new_tokens": len(ids),
        "decode_tokens": len(ids),
        "decode_s": wall - st.prefill_s,
        "prefill_tokens": st.prefill_tokens,
        "restored_tokens": st.restored_tokens,
        "prefill_s": st.prefill_s,
        "calibrate_s": st.calibrate_s,
        "rounds": st.rounds,
        "mid_proposed": st.mid_proposed,
        "mid_accepted": st.mid_accepted,
        "low_proposed": st.low_proposed,
        "low_accepted": st.low_accepted,
        "timings_s": {k: round(v, 4) for k, v in st.timings.items()},
        "stop_reason": st.stop_reason,
        "text": session.turns[-1].answer,
        "session": session,
    }


# -- transformers baselines --------------------------------------------------------------------------------
class _Clock:
    """A generate() streamer that timestamps each hand-out of tokens (the first is the prompt)."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, int]] = []

    def put(self, value) -> None:
        self.marks.append((time.perf_counter(), int(value.numel())))

    def end(self) -> None:
        pass


class HFBaseline:
    """transformers' own model on the same folder, dtype and (YaRN-extended) positions as ours."""

    def __init__(self, lm, dtype, context: int | None = None, cache: str = "dynamic"):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from triforce_chat.decoding.models.loading import extend_context

        # a GGUF file: transformers dequantizes it (slow to load, then plain dense weights)
        where = {"pretrained_model_name_or_path": lm.path}
        if lm.path.suffix == ".gguf":
            where = {"pretrained_model_name_or_path": lm.path.parent, "gguf_file": lm.path.name}
        config = AutoConfig.from_pretrained(**where)
        if context and context > config.max_position_embeddings:
            extend_context(config, context)
        self.model = AutoModelForCausalLM.from_pretrained(**where, config=config, dtype=dtype).eval()
        self.eos = sorted(lm.eos_ids)
        self.cache = cache
        self._torch = torch

    def run(self, prompt_ids: list[int], max_new_tokens: int, lookup: int | None = None) -> dict[str, Any]:
        from transformers import GenerationConfig

        torch = self._torch
        gen = GenerationConfig(
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.eos,
            pad_token_id=self.eos[0],
            prompt_lookup_num_tokens=lookup,
            cache_implementation=None if lookup or self.cache == "dynamic" else self.cache,
        )
        x = torch.tensor([prompt_ids])
        clock = _Clock()
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model.generate(x, attention_mask=torch.ones_like(x), generation_config=gen, streamer=clock)
            t_end = time.perf_counter()
        ids = out[0, len(prompt_ids) :].tolist()
        outs = clock.marks[1:]  # marks[0] is the prompt itself
        t_first, n_first = outs[0] if outs else (t_end, 0)
        return {
            "variant": HF_LOOKUP if lookup else HF_PLAIN,
            "level": None,
            "token_ids": ids,
            "prompt_tokens": len(prompt_ids),
            "new_tokens": len(ids),
            "decode_tokens": len(ids) - n_first,
            "decode_s": t_end - t_first,
            "prefill_tokens": len(prompt_ids),
            "prefill_s": t_first - t0,
            "rounds": max(0, len(outs) - 1),
            "mid_proposed": 0,
            "mid_accepted": 0,
            "low_proposed": 0,
            "low_accepted": 0,
            "timings_s": {},
            "stop_reason": "",
            "text": "",
        }


# -- the whole benchmark ------------------------------------------------------------------------------------
WARM_UP = Prompt(0, 0, "warm-up.md", "Warm-up text. " * 40, "Repeat the text.", "quote")


def warm_up(lm, cfg, levels: list[int]) -> None:
    """One short untimed answer per level: the first call at a level (and at a thread count) pays
    one-off set-up costs that would otherwise land in the first timed answer."""
    for level in levels:
        run_level(lm, cfg, WARM_UP, level, 8)


def run_bench(lm, cfg, spec: BenchSpec, dtype=None, log: Log = lambda m: None) -> dict[str, Any]:
    """Every prompt at every level (+ baselines); returns the `bench --json` object."""
    for level in spec.levels:
        if level not in LEVEL_NAMES:
            raise BenchError(f"levels must be among 0, 1, 2, not {level}")
    limit = lm.model.max_len
    for ctx in spec.contexts:
        if ctx + spec.max_new_tokens + 1 > limit:
            raise BenchError(
                f"context {ctx} + {spec.max_new_tokens} new tokens does not fit the model's "
                f"{limit} positions (use --context to extend them, e.g. --context 32768)"
            )
    load_start = load_average()
    prompts = make_prompts(lm, spec)
    # weights as shipped: transformers gets float32 (the dtype our activations use)
    hf = HFBaseline(lm, dtype or lm.model.dtype, spec.context, spec.hf_cache) if spec.hf else None
    log("warming up ...")
    warm_up(lm, cfg, spec.levels)
    if hf is not None:
        ids = run_level(lm, cfg, WARM_UP, 0, 1)["prompt_ids"]
        hf.run(ids, 8)
        hf.run(ids, 8, LOOKUP_TOKENS)
    runs: list[dict[str, Any]] = []
    sessions: dict[int, Any] = {}  # --reuse-prefill: one Session per context
    for p in prompts:
        ours: list[dict[str, Any]] = []
        for level in spec.levels:
            shared = sessions.get(p.context) if spec.reuse_prefill else None
            r = run_level(lm, cfg, p, level, spec.max_new_tokens, shared, spec.store)
            r["reused"] = shared is not None
            sessions[p.context] = r["session"]
            log(f"context {p.context} prompt {p.index} {r['variant']}: {_rate(r):.2f} tok/s, {r['new_tokens']} tokens")
            ours.append(r)
        if hf is not None:
            prompt_ids = ours[0]["prompt_ids"]
            for lookup in (None, LOOKUP_TOKENS):
                r = hf.run(prompt_ids, spec.max_new_tokens, lookup)
                log(f"context {p.context} prompt {p.index} {r['variant']}: {_rate(r):.2f} tok/s")
                ours.append(r)
        reference = ours[0]["token_ids"]
        for r in ours:
            r.update(context=p.context, prompt=p.index, question=p.question, kind=p.kind)
            r["identical"] = r["token_ids"] == reference
            r.pop("prompt_ids", None)
            r.pop("session", None)
        runs.extend(ours)
    first = {(r["context"], r["prompt"]): r for r in reversed(runs)}  # each prompt's reference run
    mismatches = [
        _mismatch(r, first[r["context"], r["prompt"]]) for r in runs if r["level"] is not None and not r["identical"]
    ]
    return {
        "machine": run_machine(lm, load_start),
        "method": __doc__.split("How time is split", 1)[1].strip().split("\n\n")[0],
        "settings": {
            "contexts": spec.contexts,
            "levels": spec.levels,
            "max_new_tokens": spec.max_new_tokens,
            "questions": spec.questions,
            "document": spec.doc[0] if spec.doc else "generated report",
            "budget": cfg.budget,
            "chunk_size": cfg.chunk_size,
            "gamma_mid": cfg.gamma_mid,
            "gamma_low": cfg.gamma_low,
            "draft": cfg.draft,
            "context": spec.context,
            "reuse_prefill": spec.reuse_prefill,
            "doc_cache": spec.store is not None,
            "hf_prompt_lookup_num_tokens": LOOKUP_TOKENS if spec.hf else None,
            "hf_cache": spec.hf_cache if spec.hf else None,
        },
        "rows": summarize(runs, spec.levels),
        "runs": runs,
        "identical": not mismatches,
        "mismatches": mismatches,
    }


def _rate(r: dict[str, Any]) -> float:
    return r["decode_tokens"] / r["decode_s"] if r["decode_s"] > 0 else 0.0


def _mismatch(run: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    a, b = run["token_ids"], ref["token_ids"]
    i = first_difference(a, b)
    return {
        "context": run["context"],
        "prompt": run["prompt"],
        "variant": run["variant"],
        "reference": ref["variant"],
        "first_difference": i,
        "got": a[i] if i < len(a) else None,
        "expected": b[i] if i < len(b) else None,
    }


def mismatch_line(m: dict[str, Any]) -> str:
    return (
        f"MISMATCH: context {m['context']}, prompt {m['prompt']}: {m['variant']} differs from "
        f"{m['reference']} at new token {m['first_difference']} "
        f"(got {m['got']}, expected {m['expected']})"
    )


def summarize(runs: list[dict[str, Any]], levels: list[int]) -> list[dict[str, Any]]:
    """One row per context and variant, summed over prompts (tokens / seconds, not a mean of rates)."""
    rows: list[dict[str, Any]] = []
    for ctx in dict.fromkeys(r["context"] for r in runs):
        group = [r for r in runs if r["context"] == ctx]
        for variant in dict.fromkeys(r["variant"] for r in group):
            rs = [r for r in group if r["variant"] == variant]
            tot = {k: sum(r[k] for r in rs) for k in _SUMMED}
            timings: dict[str, float] = {}
            for r in rs:
                for k, v in r["timings_s"].items():
                    timings[k] = round(timings.get(k, 0.0) + v, 4)
            # a run that continued another's session prefilled only its question (and maybe a draft
            # model's reading of the document): no prefill rate from it
            fresh = [r for r in rs if not r.get("reused")]
            tot["prefill_tokens"] = sum(r["prefill_tokens"] for r in fresh)
            tot["prefill_s"] = sum(r["prefill_s"] for r in fresh)
            rate = tot["decode_tokens"] / tot["decode_s"] if tot["decode_s"] > 0 else 0.0
            rows.append(
                {
                    "context": ctx,
                    "variant": variant,
                    "prompts": len(rs),
                    "prompt_tokens": round(sum(r["prompt_tokens"] for r in rs) / len(rs)),
                    "new_tokens": tot["new_tokens"],
                    "decode_tokens": tot["decode_tokens"],
                    "decode_s": round(tot["decode_s"], 4),
                    "decode_tokens_per_s": round(rate, 3),
                    "ms_per_token": round(1000 / rate, 2) if rate else None,
                    "prefill_tokens_per_s": ratio(tot["prefill_tokens"], tot["prefill_s"], 1)
                    if tot["prefill_tokens"]
                    else None,  # --reuse-prefill: no run of this row prefilled the document
                    "acceptance_mid": ratio(tot["mid_accepted"], tot["mid_proposed"]),
                    "acceptance_low": ratio(tot["low_accepted"], tot["low_proposed"]),
                    "mean_accepted_length": _mean_len(variant, tot),
                    "timings_s": timings,
                    "identical": all(r["identical"] for r in rs),
                }
            )
        for row in (r for r in rows if r["context"] == ctx):
            for key, ref in (
                ("speedup_vs_level0", LEVEL_NAMES.get(min(levels))),
                ("speedup_vs_hf", HF_PLAIN),
                ("speedup_vs_hf_lookup", HF_LOOKUP),
            ):
                base = next((r for r in rows if r["context"] == ctx and r["variant"] == ref), None)
                ok = base is not None and base["decode_tokens_per_s"] > 0
                row[key] = round(row["decode_tokens_per_s"] / base["decode_tokens_per_s"], 3) if ok else None
    return rows


_SUMMED = (
    "decode_tokens",
    "decode_s",
    "prefill_tokens",
    "prefill_s",
    "new_tokens",
    "rounds",
    "mid_proposed",
    "mid_accepted",
    "low_proposed",
    "low_accepted",
)


def _mean_len(variant: str, tot: dict[str, Any]) -> float | None:
    """Tokens kept per full-target forward: our rounds; for transformers, its hand-outs after the first."""
    if variant == HF_PLAIN:
        return 1.0
    n = tot["decode_tokens"] if variant == HF_LOOKUP else tot["new_tokens"]
    return round(n / tot["rounds"], 3) if tot["rounds"] else None


# -- machine and output --------------------------------------------------------------------------------------
def run_machine(lm, load_start: list[float]) -> dict[str, Any]:
    """The machine, and the model as this run loaded it."""
    return {
        **machine_info(load_start),
        "model": lm.model_id,
        "dtype": lm.model.weights_label,
        "device": str(lm.model.device),
        "positions": lm.model.max_len,
    }


def render_table(result: dict[str, Any]):
    """The Rich table of `result["rows"]`."""
    from rich.table import Table

    m = result["machine"]
    title = f"triforce-chat bench — {m['model']}, {m['dtype']}, {m['threads']} thread(s), {m['cpu']}"
    if result["settings"].get("hf_cache") == "static":
        title += "; HF generate with StaticCache"
    table = Table(
        title=title,
        caption="decode = tokens after the first / time after the first token; "
        "'identical' for transformers rows: same tokens as level 0 (informational)",
    )
    for col in (
        "context",
        "prompt tok",
        "level/baseline",
        "prefill tok/s",
        "decode tok/s",
        "ms/token",
        "vs level 0",
        "vs HF",
        "vs HF lookup",
        "accept mid/low",
        "mean acc len",
        "identical",
    ):
        table.add_column(col, justify="left" if col in ("level/baseline",) else "right")
    last = None
    for r in result["rows"]:
        if last is not None and r["context"] != last:
            table.add_section()
        last = r["context"]
        acc = f"{fmt(r['acceptance_mid'], '.0%')}/{fmt(r['acceptance_low'], '.0%')}"
        ident = "✓" if r["identical"] else "✗"
        if r["variant"].startswith("HF"):
            ident = f"[dim]{ident}[/dim]"
        table.add_row(
            str(r["context"]),
            str(r["prompt_tokens"]),
            r["variant"],
            fmt(r["prefill_tokens_per_s"], ".0f"),
            fmt(r["decode_tokens_per_s"]),
            fmt(r["ms_per_token"], ".1f"),
            *(fmt(r[k], ".2f", "x") for k in ("speedup_vs_level0", "speedup_vs_hf", "speedup_vs_hf_lookup")),
            acc,
            fmt(r["mean_accepted_length"]),
            ident,
        )
    return table


# -- the command --------------------------------------------------------------------------------------------
def bench_command(
    *,
    contexts: str,
    levels: str,
    doc,
    json_out: bool,
    no_hf: bool,
    questions: int,
    max_new_tokens: int,
    reuse_prefill: bool = False,
    hf_cache: str = "dynamic",
    doc_cache: bool = False,
    **options: Any,
) -> int:
    """`triforce-chat bench`: parse, load, run, print; returns the exit code (1 on a mismatch)."""
    import json

    from rich.console import Console

    from triforce_chat.app import runtime
    from triforce_chat.app.cli.main import fail, read_documents_or_fail, resolve_settings

    try:
        spec = BenchSpec(
            contexts=parse_int_list(contexts, "contexts"),
            levels=parse_int_list(levels, "levels"),
            max_new_tokens=max_new_tokens,
            questions=questions,
            hf=not no_hf,
            context=options.get("context"),
            reuse_prefill=reuse_prefill,
            hf_cache=hf_cache,
        )
    except BenchError as exc:
        fail(str(exc))
    if questions < 1:
        fail(f"questions must be >= 1, not {questions}")
    settings = resolve_settings(None, max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, **options)
    cfg = settings.decode_config()
    if doc is not None:
        spec.doc = read_documents_or_fail([doc])[0]
    if doc_cache:  # restore prefills saved by an earlier run (the prefill rates are then restores)
        spec.store = runtime.store_for(dataclasses.replace(settings, doc_cache=True))
    dtype = settings.torch_dtype()
    try:
        lm = runtime.open_model(settings, log=(lambda m: None) if json_out else None)
    except runtime.StartupError as exc:
        fail(str(exc))
    err = Console(stderr=True)
    try:
        result = run_bench(lm, cfg, spec, dtype, log=lambda m: err.print(f"[dim]{m}[/dim]", highlight=False))
    except BenchError as exc:
        fail(str(exc))
    if json_out:
        print(json.dumps(result, ensure_ascii=False))
    else:
        console = Console()
        if console.width < 150:  # a pipe or a narrow terminal: wrap lines rather than squeeze the columns
            console = Console(width=150)
        console.print(render_table(result))
    for m in result["mismatches"]:
        print(mismatch_line(m), file=sys.stderr)
    return 0 if result["identical"] else 1
