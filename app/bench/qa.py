"""`triforce-chat bench-qa`: the share of right answers on the document-QA set (app/bench/qa_set.py), and
the decode speed of each model at each speculation level and thread count.

How it runs: each model is loaded once. At each thread count, one short untimed answer per level
warms up (app/bench/levels.py `warm_up`); then each document gets one Session and one prefill, and every
question is asked at each level in turn, in a new chat each time (`Session.new_chat()`: the document
stays in the KV cache, only the question is prefilled), so that the levels of a question run side by
side; `--repeat N` asks each question N times per level, the levels' order reversed every other
time (drift on a shared machine then hits them alike). Answers are greedy and exact: temperature 0, no top-p or
top-k, no repetition penalty, the repetition stop on (as `ask` by default), at most
`--max-new-tokens` tokens. No document cache: every prefill is computed.

`--sample` asks as the chat does by default: with each model's own sampling settings (its generation
config: temperature, top-p, top-k, repetition penalty), seed SAMPLE_SEED + the repeat's index for
every answer of that repeat. Each level is then exact in distribution, not in tokens, so the levels'
answers are not compared, and a question's ratio compares two different answers (repeat to average
that out).

What is reported:
- sampling: "greedy", or (`--sample`) the settings each model's answers were sampled with.
- right answers: level 0 at the first thread count, scored by app/bench/qa_score.py. Greedy output is
  the same at every level by construction, so every other level's token ids are compared with
  level 0's at the same thread count: a difference is printed as MISMATCH and the command exits 1.
  (Across thread counts a sum may round differently and change an answer; that is reported in
  `thread_differences`, not a failure.) Level 0 always runs, since it gives the reference answers.
- decode tok/s per level and thread count: tokens / seconds totalled over the questions, from the
  session's stats (`new_tokens`, `decode_s`: the question's own prefill is not in them).
- per question, each level's speed against level 0's: the median over the repeats of the ratio of
  the two rates measured side by side (`question_ratios`), with the worst question and how many fell
  below 0.97x in each speed row. A short answer takes about a second, so one pair is noisy on a
  shared machine: repeat to tell a real loss from a hiccup.
- prefill tok/s per thread count: the documents' prefill, tokens / seconds totalled over the
  documents (the same prefill serves every level).
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from triforce_chat.app.bench.common import (
    BenchError,
    Log,
    first_difference,
    fmt,
    load_average,
    machine_info,
    machine_line,
    parse_int_list,
    ratio,
)
from triforce_chat.app.bench.levels import warm_up
from triforce_chat.app.bench.qa_score import is_right
from triforce_chat.app.bench.qa_set import ASK_SUFFIX, DOCUMENT_GROUPS, DocSet, QAItem, qa_set
from triforce_chat.decoding.config import MODEL_DEFAULT_KEYS

DEFAULT_MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b")
SAMPLE_SEED = 1000  # --sample: the seed of every answer of repeat r is SAMPLE_SEED + r


@dataclass
class QASpec:
    models: list[str]
    threads: list[int]
    levels: list[int]  # level 0 first, always there
    max_new_tokens: int = 64
    limit: int | None = None  # the first N questions of each document
    repeat: int = 1  # times each question is asked per level
    sample: bool = False  # with each model's own sampling settings (see the module docstring)
    documents: str = "all"  # which of the set's documents (qa_set.DOCUMENT_GROUPS)

    def __post_init__(self) -> None:
        if self.documents not in DOCUMENT_GROUPS:
            raise BenchError(f"documents must be one of {', '.join(DOCUMENT_GROUPS)}, not {self.documents!r}")
        for level in self.levels:
            if level not in (0, 1, 2):
                raise BenchError(f"levels must be among 0, 1, 2, not {level}")
        self.levels = [0, *dict.fromkeys(v for v in self.levels if v != 0)]
        self.threads = list(dict.fromkeys(self.threads))
        if min(self.threads) < 1:
            raise BenchError(f"threads must be >= 1, not {min(self.threads)}")
        if self.max_new_tokens < 1:
            raise BenchError(f"max-new-tokens must be >= 1, not {self.max_new_tokens}")
        if not 1 <= self.repeat <= 50:
            raise BenchError(f"repeat must be between 1 and 50, not {self.repeat}")
        if self.limit is not None and self.limit < 1:
            raise BenchError(f"limit must be >= 1, not {self.limit}")
        if not self.models:
            raise BenchError("models must not be empty")


def parse_models(text: str | None) -> list[str]:
    if text is None:
        return list(DEFAULT_MODELS)
    return list(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))


def limited(sets: list[DocSet], limit: int | None) -> list[DocSet]:
    """Each document with its first `limit` questions (all of them without a limit)."""
    return [dataclasses.replace(d, items=d.items[:limit]) for d in sets] if limit else sets


def split_installed(models: list[str]) -> tuple[list[str], list[dict[str, str]]]:
    """(models to run, models skipped with the reason): a catalogue model that is not installed is
    skipped with the command that installs it; any other name that does not resolve to a model
    is a BenchError, before anything is loaded."""
    from triforce_chat.decoding.models import catalog
    from triforce_chat.decoding.models.loading import ModelLoadError, resolve_model

    run, skipped = [], []
    for name in models:
        entry = catalog.find(name)
        if entry is not None:
            try:
                catalog.resolve(name)
            except catalog.ModelNotInstalled as exc:
                skipped.append({"model": entry.name, "reason": str(exc)})
                continue
        try:
            resolve_model(name)
        except ModelLoadError as exc:
            raise BenchError(str(exc)) from None
        run.append(name)
    return run, skipped


# -- one model ---------------------------------------------------------------------------------------------
def ask_in_new_chat(session, item: QAItem, level: int) -> dict[str, Any]:
    """Ask `item` at `level` in a new chat over the session's documents; the run's record."""
    session.new_chat()
    session.set_level(level)
    ids: list[int] = []
    for ev in session.generate(item.question + ASK_SUFFIX):
        ids.extend(ev.tokens)
    st = session.stats
    return {
        "token_ids": ids,
        "text": session.turns[-1].answer,
        "new_tokens": st.new_tokens,
        "decode_s": st.decode_s,
        "stop_reason": st.stop_reason,
        "mid_proposed": st.mid_proposed,
        "mid_accepted": st.mid_accepted,
        "low_proposed": st.low_proposed,
        "low_accepted": st.low_accepted,
        "tree_rounds": st.tree_rounds,
        "tree_second_kept": st.tree_second_kept,
    }


def run_model(lm, cfg, spec: QASpec, sets: list[DocSet], log: Log = lambda m: None) -> dict[str, Any]:
    """Every question of `sets` at every thread count and level; the model's record (see the
    module docstring for what is measured)."""
    import torch

    from triforce_chat.decoding.drafters import DrafterError
    from triforce_chat.decoding.memory.guard import MemoryShortage
    from triforce_chat.decoding.session import ContextOverflow, DocumentError, Session

    cfg = dataclasses.replace(cfg, level=0, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0,
                              stop_on_repetition=True, max_new_tokens=spec.max_new_tokens)
    if spec.sample:
        cfg = model_sampling(cfg, lm.generation_defaults)
    previous = torch.get_num_threads()
    runs: list[dict[str, Any]] = []
    prefill: list[dict[str, Any]] = []
    try:
        for threads in spec.threads:
            torch.set_num_threads(threads)
            warm_up(lm, cfg, spec.levels)
            tokens = seconds = 0.0
            for doc in sets:
                try:
                    session = Session(lm, dataclasses.replace(cfg))
                    session.add_document(doc.name, doc.text)
                    n, s = session.prefill()
                    tokens, seconds = tokens + n, seconds + s
                    log(f"{lm.model_id}, {threads} thread(s): {doc.name} prefilled, {n} tokens in {s:.1f} s")
                    # levels side by side per question (level 0 first): drift on a shared machine then
                    # hits the levels of a question alike
                    for i, item in enumerate(doc.items):
                        for rep in range(spec.repeat):
                            if spec.sample:
                                session.set_seed(SAMPLE_SEED + rep)
                            for level in (spec.levels if rep % 2 == 0 else spec.levels[::-1]):
                                r = ask_in_new_chat(session, item, level)
                                r.update(threads=threads, level=level, document=doc.name, index=i, repeat=rep)
                                runs.append(r)
                                rate = ratio(r["new_tokens"], r["decode_s"], 2)
                                log(f"{lm.model_id}, {threads} thread(s), level {level}, {doc.name} #{i}: "
                                    f"{r['new_tokens']} tokens, {rate} tok/s, {r['stop_reason']}")
                except (ContextOverflow, DocumentError, DrafterError, MemoryShortage) as exc:
                    raise BenchError(f"{lm.model_id}: {doc.name}: {exc}") from None
            prefill.append({"threads": threads, "tokens": int(tokens), "seconds": round(seconds, 4),
                            "tokens_per_s": ratio(tokens, seconds, 1)})
    finally:
        torch.set_num_threads(previous)
    record = summarize_model(lm, spec, sets, runs, prefill)
    record["sampling"] = {k: getattr(cfg, k) for k in MODEL_DEFAULT_KEYS} if spec.sample else "greedy"
    return record


def model_sampling(cfg, defaults: dict[str, Any]):
    """`cfg` with a model's recommended sampling settings, each one that is valid (as the chat takes them)."""
    for key in MODEL_DEFAULT_KEYS:
        if key in defaults:
            candidate = dataclasses.replace(cfg, **{key: defaults[key]})
            try:
                candidate.validate()
            except ValueError:
                continue
            cfg = candidate
    return cfg


def summarize_model(lm, spec: QASpec, sets: list[DocSet], runs: list[dict[str, Any]],
                    prefill: list[dict[str, Any]]) -> dict[str, Any]:
    """Score level 0 at the first thread count, check every level against level 0 at its thread
    count, and total the speeds."""
    ref = {(r["threads"], r["document"], r["index"]): r for r in runs if r["level"] == 0 and not r["repeat"]}
    mismatches = []
    for r in runs:
        base = ref[r["threads"], r["document"], r["index"]]
        r["identical"] = None if spec.sample else r["token_ids"] == base["token_ids"]  # sampled: not comparable
        if r["identical"] is False:
            i = first_difference(r["token_ids"], base["token_ids"])
            mismatches.append({
                "model": lm.model_id, "threads": r["threads"], "level": r["level"], "document": r["document"],
                "question": r["index"], "first_difference": i,
                "got": r["token_ids"][i] if i < len(r["token_ids"]) else None,
                "expected": base["token_ids"][i] if i < len(base["token_ids"]) else None,
            })
    first = spec.threads[0]
    items = {(d.name, i): item for d in sets for i, item in enumerate(d.items)}
    answers = []
    for (threads, name, i), r in ref.items():
        if threads == first:
            item = items[name, i]
            answers.append({"document": name, "index": i, "question": item.question, "accepted": list(item.accepted),
                            "answer": r["text"], "right": is_right(r["text"], item.accepted),
                            "token_ids": r["token_ids"], "stop_reason": r["stop_reason"]})
    thread_differences = [
        {"threads": t, "document": name, "index": i}
        for (t, name, i), r in ref.items()
        if t != first and r["token_ids"] != ref[first, name, i]["token_ids"] and not spec.sample
    ]
    right = sum(a["right"] for a in answers)
    by_document = {d.name: {"right": sum(a["right"] for a in answers if a["document"] == d.name),
                            "total": sum(a["document"] == d.name for a in answers)} for d in sets}
    return {
        "model": lm.model_id,
        "path": str(lm.path),
        "weights": lm.model.weights_label,
        "positions": lm.model.max_len,
        "load_s": round(lm.load_s, 2),
        "accuracy": {"right": right, "total": len(answers), "share": ratio(right, len(answers)),
                     "by_document": by_document},
        "speed": speed_rows(runs, spec),
        "question_ratios": question_ratios(runs, spec),
        "prefill": prefill,
        "answers": answers,
        "runs": [{k: v for k, v in r.items() if k not in ("text", "token_ids")} for r in runs],
        "identical": None if spec.sample else not mismatches,
        "mismatches": mismatches,
        "thread_differences": thread_differences,
    }


def question_ratios(runs: list[dict[str, Any]], spec: QASpec) -> list[dict[str, Any]]:
    """Per thread count, level (not 0) and question: the median over the repeats of the level's rate
    over level 0's, each pair measured side by side."""
    rate = {(r["threads"], r["level"], r["document"], r["index"], r["repeat"]): r["new_tokens"] / r["decode_s"]
            for r in runs if r["decode_s"] > 0 and r["new_tokens"] > 0}
    out = []
    for threads, level, doc, i in dict.fromkeys(key[:4] for key in rate if key[1]):
        pairs = [rate[threads, level, doc, i, k] / rate[threads, 0, doc, i, k] for k in range(spec.repeat)
                 if (threads, level, doc, i, k) in rate and (threads, 0, doc, i, k) in rate]
        if pairs:
            out.append({"threads": threads, "level": level, "document": doc, "index": i,
                        "ratio": round(statistics.median(pairs), 4), "pairs": [round(p, 4) for p in pairs]})
    return out


def speed_rows(runs: list[dict[str, Any]], spec: QASpec) -> list[dict[str, Any]]:
    """One row per thread count and level: totals over its questions (tokens / seconds, not a mean of
    rates), and for a level above 0 the worst question's ratio to level 0 and how many fell below 0.97x."""
    per_question = question_ratios(runs, spec)
    rows = []
    for threads in spec.threads:
        for level in spec.levels:
            rs = [r for r in runs if r["threads"] == threads and r["level"] == level]
            tot = {k: sum(r[k] for r in rs) for k in
                   ("new_tokens", "decode_s", "mid_proposed", "mid_accepted", "low_proposed", "low_accepted",
                    "tree_rounds", "tree_second_kept")}
            rows.append({
                "threads": threads,
                "level": level,
                "questions": len({(r["document"], r["index"]) for r in rs}),
                "answers": len(rs),
                "new_tokens": tot["new_tokens"],
                "decode_s": round(tot["decode_s"], 4),
                "decode_tokens_per_s": ratio(tot["new_tokens"], tot["decode_s"], 3),
                "acceptance_mid": ratio(tot["mid_accepted"], tot["mid_proposed"]),
                "acceptance_low": ratio(tot["low_accepted"], tot["low_proposed"]),
                "tree_rounds": tot["tree_rounds"],
                "tree_second_kept": tot["tree_second_kept"],
            })
            mine = [q["ratio"] for q in per_question if q["threads"] == threads and q["level"] == level]
            if mine:
                rows[-1].update(worst_question_ratio=min(mine), questions_below_0_97=sum(x < 0.97 for x in mine))
    return rows


# -- the whole benchmark ------------------------------------------------------------------------------------
def qa_set_info(sets: list[DocSet]) -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "questions": sum(len(d.items) for d in sets),
        "ask_suffix": ASK_SUFFIX,
        "documents": [{"name": d.name, "source": d.source, "characters": len(d.text), "questions": len(d.items)}
                      for d in sets],
    }


def mismatch_line(m: dict[str, Any]) -> str:
    return (
        f"MISMATCH: {m['model']}, {m['threads']} thread(s), {m['document']} question {m['question']}: level "
        f"{m['level']} differs from level 0 at new token {m['first_difference']} "
        f"(got {m['got']}, expected {m['expected']})"
    )


def render_table(result: dict[str, Any]):
    """The Rich table: one row per model."""
    from rich.table import Table

    s, qa = result["settings"], result["qa_set"]
    table = Table(
        title=f"triforce-chat bench-qa — {qa['questions']} questions over {len(qa['documents'])} documents, "
        f"{'sampled with each model' + chr(39) + 's settings' if s.get('sample') else 'greedy'}, "
        f"at most {s['max_new_tokens']} new tokens",
        caption="right: level 0 answers at the first thread count; L0 1thr: level 0 on 1 thread; decode: tokens / "
        "decode seconds over all questions; prefill: the documents' prefill",
    )
    table.add_column("model", justify="left", overflow="fold")
    table.add_column("right", justify="right")
    table.add_column("accuracy", justify="right")
    for t in s["threads"]:
        for level in s["levels"]:
            table.add_column(f"L{level} {t}thr\ndecode tok/s", justify="right")
    for t in s["threads"]:
        table.add_column(f"{t}thr\nprefill tok/s", justify="right")
    table.add_column("levels agree", justify="right")
    for m in result["models"]:
        acc = m["accuracy"]
        speed = {(r["threads"], r["level"]): r["decode_tokens_per_s"] for r in m["speed"]}
        pre = {p["threads"]: p["tokens_per_s"] for p in m["prefill"]}
        table.add_row(
            m["model"],
            f"{acc['right']}/{acc['total']}",
            fmt(acc["share"], ".0%"),
            *(fmt(speed.get((t, level)), ".2f") for t in s["threads"] for level in s["levels"]),
            *(fmt(pre.get(t), ".0f") for t in s["threads"]),
            "sampled" if m["identical"] is None else "✓" if m["identical"] else "[bold red]✗ MISMATCH[/bold red]",
        )
    return table


def question_lines(result: dict[str, Any]) -> list[str]:
    """Per model: its right answers per document; per thread count and level above 0: the slowest
    question against level 0, and how many fell below 0.97x (each question's ratio: the median of
    its side-by-side pairs)."""
    lines = []
    for m in result["models"]:
        per_doc = ", ".join(f"{name} {c['right']}/{c['total']}" for name, c in m["accuracy"]["by_document"].items())
        lines.append(f"{m['model']}, right per document: {per_doc}")
        for threads in result["settings"]["threads"]:
            for level in result["settings"]["levels"][1:]:
                qs = [q for q in m["question_ratios"] if q["threads"] == threads and q["level"] == level]
                if not qs:
                    continue
                worst = min(qs, key=lambda q: q["ratio"])
                lines.append(
                    f"{m['model']}, {threads} thread(s), level {level} / level 0 per question "
                    f"(median of {len(worst['pairs'])} pair(s)): worst {worst['ratio']:.2f}x "
                    f"({worst['document']} #{worst['index']}), {sum(q['ratio'] < 0.97 for q in qs)} of {len(qs)} "
                    "below 0.97x")
    return lines


def run_bench_qa(load: Callable[[str], Any], spec: QASpec, cfg, log: Log = lambda m: None,
                 skipped: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """Every model of `spec` (loaded by `load(name)`, released after); the `bench-qa --json` object."""
    load_start = load_average()
    sets = limited(qa_set(spec.documents), spec.limit)
    models = []
    for name in spec.models:
        lm = load(name)
        models.append(run_model(lm, cfg, spec, sets, log))
        del lm
        gc.collect()
    mismatches = [x for m in models for x in m["mismatches"]]
    return {
        "machine": machine_info(load_start),
        "method": __doc__.split("What is reported:", 1)[1].strip(),
        "settings": {"models": spec.models, "threads": spec.threads, "levels": spec.levels,
                     "max_new_tokens": spec.max_new_tokens, "limit": spec.limit, "repeat": spec.repeat,
                     "sample": spec.sample, "documents": spec.documents,
                     "budget": cfg.budget,
                     "draft": cfg.draft, "gamma_mid": cfg.gamma_mid, "gamma_low": cfg.gamma_low},
        "qa_set": qa_set_info(sets),
        "models": models,
        "skipped": skipped or [],
        "identical": None if spec.sample else not mismatches,
        "mismatches": mismatches,
    }


# -- the command --------------------------------------------------------------------------------------------
def bench_qa_command(*, models: str | None, threads: str, levels: str, max_new_tokens: int, limit: int | None,
                     json_out: bool, repeat: int = 1, sample: bool = False, documents: str = "all",
                     **options: Any) -> int:
    """`triforce-chat bench-qa`: parse, check the models, run, print; the exit code (1 on a mismatch)."""
    from rich.console import Console
    from rich.markup import escape

    from triforce_chat.app import runtime
    from triforce_chat.app.cli.main import fail, resolve_settings, say
    from triforce_chat.app.safe_text import json_text

    try:
        spec = QASpec(models=parse_models(models), threads=parse_int_list(threads, "threads"),
                      levels=parse_int_list(levels, "levels"), max_new_tokens=max_new_tokens, limit=limit,
                      repeat=repeat, sample=sample, documents=documents)
        runnable, skipped = split_installed(spec.models)
    except BenchError as exc:
        fail(str(exc))
    for s in skipped:
        say(f"skipped {s['model']}: {s['reason']}")
    if not runnable:
        fail("no model to run: " + "; ".join(s["reason"] for s in skipped))
    spec.models = runnable
    given = dict(max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0,
                 stop_on_repetition=True, level=0, **options)
    settings = resolve_settings(None, **given)
    cfg = settings.decode_config()
    runtime.apply_threads(settings)

    def load(name: str):
        try:
            return runtime.open_model(resolve_settings(None, **given, model=name),
                                      log=(lambda m: None) if json_out else None)
        except runtime.StartupError as exc:
            fail(str(exc))

    err = Console(stderr=True, soft_wrap=True)  # one line per answer, also in a log file
    try:
        result = run_bench_qa(load, spec, cfg, log=lambda m: err.print(f"[dim]{escape(m)}[/dim]", highlight=False),
                              skipped=skipped)
    except BenchError as exc:
        fail(str(exc))
    if json_out:
        print(json_text(result))
    else:
        console = Console()
        if console.width < 150:  # a pipe or a narrow terminal: wrap lines rather than squeeze the columns
            console = Console(width=150)
        m = result["machine"]
        console.print(f"{machine_line(m)} | torch {m['torch']} | Python {m['python']}", highlight=False, markup=False)
        console.print(render_table(result))
        for line in question_lines(result):
            console.print(line, highlight=False, markup=False, soft_wrap=True)
    for s in skipped:
        say(f"skipped {s['model']}: {s['reason']}")
    for m in result["models"]:
        if m["thread_differences"]:
            say(f"note: {m['model']}: {len(m['thread_differences'])} answer(s) differ between thread counts "
                "(a sum rounded differently; the levels agree at each thread count)")
    for x in result["mismatches"]:
        print(mismatch_line(x), file=sys.stderr)
    return 0 if result["identical"] is not False else 1
