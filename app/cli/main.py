"""Command line: `triforce-chat [--doc F]...` starts the chat UI; `ask` answers headless; `bench`
measures the speculation levels side by side; `bench-llama` puts them next to llama.cpp; `bench-qa`
scores answers on a document-QA set.

Every option's default comes from the settings file (app/settings.py), and every bad input ends
in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from triforce_chat.app.cli.cache import cache_app
from triforce_chat.app.cli.models import models_app
from triforce_chat.decoding.models.catalog import DEFAULT_MODEL_NAME

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a command stopped with ctrl-c

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Chat with long documents; answers come from a lossless hierarchical speculative decoder.",
)
app.add_typer(cache_app, name="cache")


app.add_typer(models_app, name="models")


class CliError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


MAX_STDIN_QUESTION = 1 << 20  # characters: far more than a context holds


def fail(message: str) -> None:
    raise CliError(message)


def say(message: str) -> None:
    """A line for the user on stderr, with any control characters from file names or documents
    shown as visible pictures (app/safe_text.py)."""
    from triforce_chat.app.safe_text import one_line

    print(one_line(message), file=sys.stderr)


# -- shared option handling ----------------------------------------------------------------------------
def resolve_settings(config: Path | None, warn=None, **cli: Any):
    """Settings from defaults <- config file <- the flags actually given. With `warn`, problems in
    the config file are passed to it (the defaults stand in for what is wrong); bad flags fail."""
    from triforce_chat.app.settings import SettingsError, load_settings

    try:
        return load_settings(config, warn=warn).merged(**{k: v for k, v in cli.items() if v is not None})
    except SettingsError as exc:
        fail(str(exc))


SETTING_NAMES = (
    "model", "level", "draft", "budget", "chunk_size", "gamma_mid", "gamma_low", "max_new_tokens", "temperature",
    "top_p", "top_k", "repetition_penalty", "repetition_window", "stop_on_repetition", "seed", "weights", "kv_dtype",
    "device", "threads", "context", "theme",
)


def given_settings(options: dict[str, Any]) -> dict[str, Any]:
    """The settings among a command's options; `--truncate` is a flag, so False means "not given"
    (and `--no-doc-cache` turns the document cache off, or leaves the setting)."""
    out = {k: options[k] for k in SETTING_NAMES if k in options}
    out["truncate"] = options.get("truncate") or None
    out["doc_cache"] = False if options.get("no_doc_cache") else None
    return out


def startup_or_fail(error: BaseException) -> None:
    """A startup or document problem (app/runtime.py) as the CLI shows every bad input: one line, exit 2."""
    fail(str(error))


def read_documents_or_fail(paths: list[Path] | None, warn=None) -> list[tuple[str, str]]:
    """Each document's (name, text), or one line and exit 2; warnings (bad UTF-8, NUL bytes, a pipe's
    wait) go to `warn`, stderr by default."""
    from triforce_chat.app.runtime import read_document
    from triforce_chat.decoding.session import DocumentError

    try:
        return [read_document(p, warn=warn or say) for p in paths or []]
    except DocumentError as exc:
        fail(str(exc))


# Options shared by the chat and `ask` (names and validation are the same in both)
DocOpt = Annotated[
    list[Path] | None, typer.Option("--doc", "-d", help="Text file to put into the context (repeatable).")
]
ModelOpt = Annotated[
    str | None,
    typer.Option(
        help=f"A catalogue name (default {DEFAULT_MODEL_NAME}; see 'models'), a .gguf file or a model folder."
    ),
]
LevelOpt = Annotated[
    int | None, typer.Option(help="Speculation level: 0 plain, 1 retrieval draft, 2 + bottom drafter.")
]
DraftOpt = Annotated[
    str | None, typer.Option(help="Bottom drafter: 'suffix' (default), 'ngram' or a draft model sharing the tokenizer.")
]
BudgetOpt = Annotated[
    str | None, typer.Option(help="Retrieval budget: tokens (4096) or a fraction of the context (0.1).")
]
ChunkOpt = Annotated[int | None, typer.Option("--chunk-size", help="Retrieval chunk size in tokens.")]
GammaMidOpt = Annotated[
    int | None, typer.Option("--gamma-mid", help="Max tokens the middle level drafts per round.")
]
GammaLowOpt = Annotated[
    int | None, typer.Option("--gamma-low", help="Max tokens the bottom drafter proposes.")
]
MaxNewOpt = Annotated[int | None, typer.Option("--max-new-tokens", "-n", help="Stop after this many tokens.")]
TempOpt = Annotated[float | None, typer.Option(help="0 is greedy.")]
TopPOpt = Annotated[float | None, typer.Option("--top-p", help="Nucleus sampling mass, in (0, 1].")]
TopKOpt = Annotated[int | None, typer.Option("--top-k", help="Sample among the k likeliest tokens (0: off).")]
RepPenaltyOpt = Annotated[
    float | None,
    typer.Option("--repetition-penalty", help="Penalty for tokens among the recent ones (1: off; also in greedy)."),
]
RepWindowOpt = Annotated[
    int | None,
    typer.Option("--repetition-window", help="Recent tokens the penalty looks at (0: the whole context)."),
]
LoopStopOpt = Annotated[
    bool | None,
    typer.Option("--stop-on-repetition/--no-stop-on-repetition",
                 help="Stop an answer that keeps repeating the same span (on by default)."),
]
SeedOpt = Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")]
WeightsOpt = Annotated[
    str | None,
    typer.Option("--weights", "--dtype", help="auto (as shipped: GGUF blocks); float32/bfloat16/float16: dequantized."),
]
KvDtypeOpt = Annotated[
    str | None, typer.Option("--kv-dtype", help="KV cache storage: auto (float16 on CPU), float16, bfloat16, float32.")
]
DeviceOpt = Annotated[str | None, typer.Option(help="auto, cpu or cuda.")]
ThreadsOpt = Annotated[int | None, typer.Option(help="CPU threads for torch.")]
ContextOpt = Annotated[
    int | None,
    typer.Option(help="Context in tokens: more than the model's positions extends them (YaRN), fewer saves memory."),
]
TruncateOpt = Annotated[
    bool, typer.Option("--truncate", help="Keep head and tail of documents too long to fit.")
]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="Settings file (TOML).")]
NoDocCacheOpt = Annotated[
    bool, typer.Option("--no-doc-cache", help="Neither restore nor save prefilled documents (see `cache ls`).")
]


@app.callback(invoke_without_command=True)
def chat(
    ctx: typer.Context,
    doc: DocOpt = None,
    model: ModelOpt = None,
    level: LevelOpt = None,
    draft: DraftOpt = None,
    budget: BudgetOpt = None,
    chunk_size: ChunkOpt = None,
    gamma_mid: GammaMidOpt = None,
    gamma_low: GammaLowOpt = None,
    max_new_tokens: MaxNewOpt = None,
    temperature: TempOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    repetition_penalty: RepPenaltyOpt = None,
    repetition_window: RepWindowOpt = None,
    stop_on_repetition: LoopStopOpt = None,
    seed: SeedOpt = None,
    weights: WeightsOpt = None,
    kv_dtype: KvDtypeOpt = None,
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
    context: ContextOpt = None,
    truncate: TruncateOpt = False,
    theme: Annotated[str | None, typer.Option(help="triforce-dark or triforce-light.")] = None,
    resume: Annotated[str | None, typer.Option(help="Reopen a saved conversation: an id or 'last'.")] = None,
    no_doc_cache: NoDocCacheOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Start the chat UI (the default command)."""
    if ctx.invoked_subcommand is not None:
        return
    notices: list[str] = []
    settings = resolve_settings(config, warn=notices.append, **given_settings(locals()))
    from triforce_chat.app.runtime import DocumentText

    def warn(message: str) -> None:  # said now (a pipe's wait) and again in the chat, over which stderr is hidden
        say(message)
        notices.append(message)

    texts = read_documents_or_fail(doc, warn)  # a bad path fails here, before the UI starts; read once (a pipe)
    from triforce_chat.app.ui.app import run_tui

    docs = [DocumentText(path, text) for path, (_, text) in zip(doc or [], texts, strict=True)]
    raise typer.Exit(run_tui(settings, docs, resume, notices=notices))


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="The question (use - to read it from stdin).")],
    doc: DocOpt = None,
    model: ModelOpt = None,
    level: LevelOpt = None,
    draft: DraftOpt = None,
    budget: BudgetOpt = None,
    chunk_size: ChunkOpt = None,
    gamma_mid: GammaMidOpt = None,
    gamma_low: GammaLowOpt = None,
    max_new_tokens: MaxNewOpt = None,
    temperature: TempOpt = None,
    top_p: TopPOpt = None,
    top_k: TopKOpt = None,
    repetition_penalty: RepPenaltyOpt = None,
    repetition_window: RepWindowOpt = None,
    stop_on_repetition: LoopStopOpt = None,
    seed: SeedOpt = None,
    weights: WeightsOpt = None,
    kv_dtype: KvDtypeOpt = None,
    device: DeviceOpt = None,
    threads: ThreadsOpt = None,
    context: ContextOpt = None,
    truncate: TruncateOpt = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object at the end.")] = False,
    sources: Annotated[
        bool, typer.Option("--sources", help="After the answer, print the passages it drew on, one per line.")
    ] = False,
    no_doc_cache: NoDocCacheOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Answer one question about the documents, streaming the text to stdout.

    Ctrl-C ends the answer at the last token printed: the text so far (or, with --json, the object
    with stop_reason "interrupted"), then "interrupted" on stderr and exit code 130."""
    import threading

    from triforce_chat.app.cli.interrupt import first_sigint_stops
    from triforce_chat.app.safe_text import json_text

    settings = resolve_settings(config, warn=lambda m: say(f"warning: {m}"), **given_settings(locals()))
    if question == "-":  # read up to a bound: `ask - < /dev/zero` read until the memory ran out
        question = sys.stdin.read(MAX_STDIN_QUESTION + 1)
        if len(question) > MAX_STDIN_QUESTION:
            fail(f"the question on standard input is over {MAX_STDIN_QUESTION:,} characters; "
                 "long text belongs in a --doc")
    if not question.strip():
        fail("the question is empty")
    docs = read_documents_or_fail(doc)
    from triforce_chat.app import runtime

    try:
        session = runtime.open_session(settings, log=(lambda m: None) if json_out else None)
    except runtime.StartupError as exc:
        fail(str(exc))
    for notice in session.lm.notices:  # on stderr with --json too: stdout holds only the JSON
        say(f"notice: {notice}")
    interrupted = threading.Event()
    with first_sigint_stops(interrupted.set):
        result = run_ask(session, docs, question, stream=None if json_out else sys.stdout,
                         should_stop=interrupted.is_set)
    if interrupted.is_set():
        result["stats"]["stop_reason"] = "interrupted"
    if json_out:
        print(json_text(result))  # model text may hold escape sequences: written as \u escapes
    else:
        sys.stdout.write("\n")
        if sources:
            for line in source_lines(result["sources"]):
                sys.stdout.write(line + "\n")
        if result["stats"]["stop_reason"] == "repetition":
            say("stopped: repetition (the answer kept repeating itself; --no-stop-on-repetition lets it go on)")
    if interrupted.is_set():
        sys.stdout.flush()
        say("interrupted")
        raise typer.Exit(EXIT_INTERRUPTED)


SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty", "repetition_window", "seed")


def run_ask(
    session, docs: list[tuple[str, str]], question: str, stream=None, should_stop=None, warn=lambda m: say(m),
) -> dict[str, Any]:
    """Answer headless in a session from `runtime.open_session`; returns the `ask --json` object (also
    used by bench and tests). `stream` gets the answer as it comes, made safe for a terminal;
    `should_stop()` ends it early (during the prefill: an empty answer). The documents are prefilled
    before the question, as in the chat, so that the document cache keeps them for any later question."""
    from triforce_chat.app.safe_text import terminal_text
    from triforce_chat.decoding.memory.guard import MemoryShortage
    from triforce_chat.decoding.session import ContextOverflow, DocumentError, PrefillCancelled

    cfg, lm = session.config, session.lm
    shown = ""
    try:
        for name, text in docs:
            session.add_document(name, text)
        token_ids: list[int] = []
        try:
            if docs and not cfg.truncate:  # --truncate cuts documents to fit the question: at generate()
                session.prefill(should_cancel=should_stop)
                for notice in session.take_notices():
                    warn(f"warning: {notice}")
            for ev in session.generate(question, should_cancel=should_stop):
                token_ids.extend(ev.tokens)
                if stream is not None and ev.text:
                    stream.write(terminal_text(ev.text))
                    stream.flush()
                    shown += ev.text
        except PrefillCancelled:
            pass  # stopped before the first token: no answer
    except (ContextOverflow, DocumentError, MemoryShortage) as exc:
        fail(str(exc))
    for notice in session.take_notices():
        warn(f"warning: {notice}")
    answered = bool(session.turns) and session.turns[-1].question == question
    text = session.turns[-1].answer if answered else ""
    if stream is not None and text.startswith(shown) and len(text) > len(shown):
        stream.write(terminal_text(text[len(shown):]))  # a character held back until it was whole
        stream.flush()
    stats = session.stats.to_dict()
    stats["cache"] = session.cache_figures().to_dict()
    return {
        "text": text,
        "token_ids": token_ids,
        "token_origins": session.stats.token_origins,
        "prompt_token_ids": session.last_prompt_ids if answered else [],
        "level": cfg.level,
        "model": lm.model_id,
        "model_path": str(lm.path),
        "weights": lm.model.weights_label,
        "kv_dtype": str(session.cache.k.dtype).removeprefix("torch."),
        "sampling": {key: getattr(cfg, key) for key in SAMPLING_KEYS},
        "sources": [x.to_dict() for x in session.turns[-1].sources] if answered else [],
        "stats": stats,
    }


def source_lines(sources: list[dict[str, Any]], width: int = 100) -> list[str]:
    """`ask --sources`: a heading, then one line per passage (document, lines, share of the attention,
    the start of its text), made safe for a terminal; a line saying so when there are none."""
    from triforce_chat.app.safe_text import one_line
    from triforce_chat.decoding.sources import Source

    if not sources:
        return ["sources: none (no document text drew the answer's attention)"]
    out = ["sources:"]
    for i, s in enumerate(sources, 1):
        span = Source.from_dict(s).lines_label
        words = " ".join(s["text"].split())
        words = words if len(words) <= width else words[: width - 1].rstrip() + "…"
        out.append(one_line(f"  [{i}] {s['document']} {span} ({s['score']:.0%}): {words}"))
    return out


@app.command()
def bench(
    contexts: Annotated[str, typer.Option(help="Comma list of approximate prompt lengths.")] = "1024,7168",
    levels: Annotated[str, typer.Option(help="Comma list of speculation levels to compare.")] = "0,1,2",
    doc: Annotated[Path | None, typer.Option("--doc", "-d", help="A file, not the generated report.")] = None,
    model: ModelOpt = None,
    draft: DraftOpt = None,
    budget: BudgetOpt = None,
    chunk_size: ChunkOpt = None,
    gamma_mid: GammaMidOpt = None,
    gamma_low: GammaLowOpt = None,
    context: ContextOpt = None,
    weights: Annotated[
        str, typer.Option("--weights", "--dtype", help="auto (as shipped), float32, bfloat16, float16.")
    ] = "auto",
    threads: Annotated[int, typer.Option(help="CPU threads for torch (1: stable numbers).")] = 1,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens per answer.")] = 128,
    questions: Annotated[int, typer.Option(help="Prompts per context.")] = 2,
    no_hf: Annotated[bool, typer.Option("--no-hf", help="Skip the transformers generate baselines.")] = False,
    hf_cache: Annotated[
        str, typer.Option("--hf-cache", help="Cache of plain transformers generate: dynamic or static.")
    ] = "dynamic",
    reuse_prefill: Annotated[
        bool,
        typer.Option(
            "--reuse-prefill",
            help="One prefill per context: later levels and questions keep its cache (long contexts).",
        ),
    ] = False,
    doc_cache: Annotated[
        bool,
        typer.Option("--doc-cache", help="Restore/save the documents' prefill in the document cache (reruns)."),
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Compare levels 0/1/2 and transformers generate on the same prompts; exit 1 if the levels disagree."""
    from triforce_chat.app.bench.levels import bench_command

    raise typer.Exit(
        bench_command(
            contexts=contexts,
            levels=levels,
            doc=doc,
            json_out=json_out,
            no_hf=no_hf,
            hf_cache=hf_cache,
            reuse_prefill=reuse_prefill,
            doc_cache=doc_cache,
            questions=questions,
            max_new_tokens=max_new_tokens,
            model=model,
            draft=draft,
            budget=budget,
            chunk_size=chunk_size,
            gamma_mid=gamma_mid,
            gamma_low=gamma_low,
            context=context,
            weights=weights,
            threads=threads,
        )
    )


@app.command("bench-llama")
def bench_llama(
    model: Annotated[
        str | None, typer.Option(help="A .gguf file run by both engines; default the bundled SmolLM2 GGUF.")
    ] = None,
    contexts: Annotated[str, typer.Option(help="Comma list of approximate prompt lengths.")] = "1024,7168,29000",
    threads: Annotated[str, typer.Option(help="Comma list of thread counts, the same for both engines.")] = "1,2",
    levels: Annotated[str, typer.Option(help="Comma list of our speculation levels to run.")] = "0,1,2",
    new_tokens: Annotated[int, typer.Option("--new-tokens", "-n", help="Greedy tokens decoded per run.")] = 64,
    reps: Annotated[int, typer.Option(help="Alternating repetitions per context (medians are shown).")] = 3,
    context: ContextOpt = None,
    doc: Annotated[Path | None, typer.Option("--doc", "-d", help="A file, not the generated report.")] = None,
    weights: Annotated[
        str, typer.Option("--weights", "--dtype", help="Ours: auto (the file's blocks, as shipped), float32, bfloat16.")
    ] = "auto",
    kv_dtype: KvDtypeOpt = None,
    budget: BudgetOpt = None,
    chunk_size: ChunkOpt = None,
    gamma_mid: GammaMidOpt = None,
    gamma_low: GammaLowOpt = None,
    llama_flash_attn: Annotated[
        bool, typer.Option("--llama-flash-attn/--no-llama-flash-attn", help="llama.cpp's flash attention.")
    ] = True,
    kernels: Annotated[bool, typer.Option("--kernels", help="Add kernel figures (kernels/bench_cpu.py).")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Our engine next to llama.cpp on the same GGUF file, prompt ids and threads (needs the 'bench' extra)."""
    options = dict(locals())
    from triforce_chat.app.bench.llama import bench_llama_command

    raise typer.Exit(bench_llama_command(**options))


@app.command("bench-qa")
def bench_qa(
    models: Annotated[
        str | None,
        typer.Option(help="Comma list of models (default: smollm2-135m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b)."),
    ] = None,
    threads: Annotated[str, typer.Option(help="Comma list of CPU thread counts.")] = "1,2",
    levels: Annotated[str, typer.Option(help="Comma list of levels (0 always runs: it gives the answers).")] = "0,2",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens per answer at most.")] = 64,
    limit: Annotated[int | None, typer.Option(help="Ask only the first N questions of each document.")] = None,
    documents: Annotated[
        str, typer.Option(help="Which documents: all, first-four (the set before the held-out ones) or held-out.")
    ] = "all",
    repeat: Annotated[int, typer.Option(help="Ask each question N times per level (per-question: the median).")] = 1,
    sample: Annotated[
        bool, typer.Option("--sample", help="Sample with each model's own settings, as the chat does (seeded; "
                           "the levels' answers then differ and are not compared).")
    ] = False,
    draft: DraftOpt = None,
    context: ContextOpt = None,
    weights: WeightsOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object, every answer included.")] = False,
) -> None:
    """Right answers on the document-QA set, and decode tok/s per level and thread count; exit 1 if levels disagree."""
    from triforce_chat.app.bench.qa import bench_qa_command

    raise typer.Exit(bench_qa_command(models=models, threads=threads, levels=levels, max_new_tokens=max_new_tokens,
                                      limit=limit, json_out=json_out, repeat=repeat, sample=sample, draft=draft,
                                      context=context, weights=weights, documents=documents))


@app.command("bench-sources")
def bench_sources(
    contexts: Annotated[
        str, typer.Option(help="Comma list of context lengths (about 7168; 29000 if time allows).")
    ] = "7168",
    overhead: Annotated[
        int, typer.Option(help="Answer the first N questions of each context again without sources, side by side.")
    ] = 3,
    every: Annotated[int, typer.Option(help="Answer tokens between two readings of the attention.")] = 4,
    limit: Annotated[int | None, typer.Option(help="Ask only the first N questions of each context.")] = None,
    model: ModelOpt = None,
    level: LevelOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", help="Tokens per answer at most.")] = 96,
    threads: ThreadsOpt = None,
    context: ContextOpt = None,
    weights: WeightsOpt = None,
    doc_cache: Annotated[
        bool, typer.Option("--doc-cache", help="Restore/save the documents' prefill in the document cache (reruns).")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object, every answer included.")] = False,
) -> None:
    """Whether an answer's top 3 sources hold its answer, next to BM25; and what sources cost; exit 1 if
    sources changed an answer's tokens."""
    from triforce_chat.app.bench.sources import bench_sources_command

    # (flags not given are None: resolve_settings leaves them to the config file and the defaults)
    raise typer.Exit(bench_sources_command(contexts=contexts, overhead=overhead, every=every, limit=limit,
                                           json_out=json_out, doc_cache=doc_cache, max_new_tokens=max_new_tokens,
                                           model=model, level=level, threads=threads, context=context,
                                           weights=weights))


def main() -> None:
    """Console entry point: user errors become one line and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for stream in (sys.stdout, sys.stderr):  # a terminal that cannot show a character gets an escape, not a crash
        if hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(errors="backslashreplace")
            except (ValueError, OSError):
                pass
    try:
        code = app(standalone_mode=False)  # a `typer.Exit(n)` comes back as n in this mode
    except CliError as exc:
        say(f"error: {exc}")
        sys.exit(EXIT_USAGE)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        say("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:  # click usage errors and the like
        import click

        # typer vendors its own click: its usage errors (a bad number, say) are TyperExceptions
        if isinstance(exc, click.exceptions.ClickException | typer.TyperException) and hasattr(exc, "format_message"):
            say(f"error: {exc.format_message()}")
            sys.exit(EXIT_USAGE)
        raise
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
