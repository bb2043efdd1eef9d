"""Restore against prefill, side by side: what the document cache saves, and what saving costs.

One process, one loaded model, one document set, prefilled the way the chat does it:

1. prefill without a store (what every start cost before the cache);
2. prefill into an empty store (the same, plus saving: the save overhead);
3. restore from the store with the page cache warm (reopening a book just closed);
4. restore after dropping the store's pages from the page cache (`posix_fadvise(DONTNEED)`: the
   files were fsync'ed, so their pages are clean and the kernel drops them; close to a cold start,
   short of a reboot);
5. answer one question after 1 and after 3 and check the tokens are identical.

Prints the file size, the restore time and read bandwidth, the prefill time it replaces, and the
save overhead as a fraction of the prefill (the wall-time difference of 2 and 1, and the prefill
thread's own time spent saving, which does not depend on the machine's other load). For the issue's
29K-token figure (without --doc, the document is Python's documentation topics, as in the README's
29K table):

    python -m triforce_chat.app.bench.doccache --tokens 29000 --context 32768 --dtype bfloat16 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

QUESTION = "What is the document about? Answer in one sentence."


def _drop_page_cache(root: Path) -> None:
    for path in root.rglob("*.kv"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run(
    lm, cfg, doc_name: str, doc_text: str, store_root: Path, chunk_tokens: int | None = None,
    question: str = QUESTION, cold: bool = True, log=lambda m: None,
) -> dict[str, Any]:
    """The five steps of the module docstring; returns every figure (seconds, bytes, tokens)."""
    from triforce_chat.decoding.drafters import make_drafter
    from triforce_chat.decoding.session import Session
    from triforce_chat.decoding.store.docstore import DEFAULT_CHUNK_TOKENS, DocumentStore
    from triforce_chat.kernels.retrieval import ChunkMeans

    store = DocumentStore(store_root, max_bytes=2**50, chunk_tokens=chunk_tokens or DEFAULT_CHUNK_TOKENS)

    def opened(with_store: bool) -> tuple[Session, float]:
        t0 = time.perf_counter()
        s = Session(lm, cfg, store=store if with_store else None)  # with a store: the fingerprint
        s.add_document(doc_name, doc_text)
        return s, time.perf_counter() - t0

    def answer(s: Session) -> list[int]:
        return [t for ev in s.generate(question) for t in ev.tokens]

    log("1/5 prefill without a store")
    fresh, _ = opened(False)
    fresh.prefill()
    plain = fresh.last_sync
    log("2/5 prefill into an empty store")
    saver, _ = opened(True)
    saver.prefill()
    saved = saver.last_sync
    del saver
    file_bytes = store.usage()
    n_files = sum(1 for _ in store_root.rglob("*.kv"))
    log("3/5 restore (warm page cache)")
    warm_session, open_s = opened(True)
    warm_session.prefill()
    warm = warm_session.last_sync
    cold_report = None
    if cold:
        log("4/5 restore (pages dropped)")
        del warm_session
        _drop_page_cache(store_root)
        warm_session, _ = opened(True)
        warm_session.prefill()
        cold_report = warm_session.last_sync
    # what a restore rebuilds instead of reading: the retrieval chunk means (inside the restore
    # time above) and the suffix index (at the first level-2 answer)
    t0 = time.perf_counter()
    ChunkMeans(warm_session.cache, cfg.chunk_size)
    means_s = time.perf_counter() - t0
    ids = warm_session.context
    t0 = time.perf_counter()
    make_drafter("suffix", lm).extend(ids)
    lookup_s = time.perf_counter() - t0
    log("5/5 answers after prefill and after restore")
    a, b = answer(fresh), answer(warm_session)

    def restore_figures(r) -> dict[str, Any]:
        return {"restored_tokens": r.restored, "computed_tokens": r.computed, "seconds": r.seconds,
                "restore_s": r.restore_s, "read_gb_per_s": file_bytes / r.restore_s / 1e9 if r.restore_s else None,
                "notices": r.notices}

    prefill_s = plain.seconds
    return {
        "model": lm.model_id,
        "dtype": str(getattr(lm.model, "weights_label", lm.model.dtype)).removeprefix("torch."),  # weights as loaded
        "kv_dtype": str(fresh.cache.k.dtype).removeprefix("torch."),
        "threads": _threads(),
        "tokens": plain.target,
        "chunk_tokens": warm_session.doc_cache.chunk_tokens if warm_session.doc_cache else None,
        "file_bytes": file_bytes,
        "files": n_files,
        "bytes_per_token": fresh.cache.bytes_per_token,
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": plain.computed / prefill_s if prefill_s else None,
        "prefill_with_save_s": saved.seconds,
        "saved_tokens": saved.saved,
        "save_overhead_wall": (saved.seconds - prefill_s) / prefill_s if prefill_s else None,
        "save_overhead_thread": saved.save_s / saved.seconds if saved.seconds else None,
        "save_thread_s": saved.save_s,
        "writer_s": saved.write_s,
        "session_open_s": open_s,
        "restore_warm": restore_figures(warm),
        "restore_cold": restore_figures(cold_report) if cold_report else None,
        "chunk_means_s": means_s,
        "lookup_index_s": lookup_s,
        "answer_tokens": len(a),
        "identical": a == b,
        "level": cfg.level,
    }


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def format_report(r: dict[str, Any]) -> str:
    mib = r["file_bytes"] / 2**20
    warm, cold = r["restore_warm"], r["restore_cold"]

    def restore_line(name: str, x: dict[str, Any]) -> str:
        speed = r["prefill_s"] / x["seconds"] if x["seconds"] else float("inf")
        bw = f"{x['read_gb_per_s']:.2f} GB/s" if x["read_gb_per_s"] else "-"
        line = (f"restore ({name})".ljust(26) + f"{x['seconds']:8.2f} s   {x['restored_tokens']:,} tokens restored, "
                f"{x['computed_tokens']:,} prefilled; reading {x['restore_s']:.2f} s at {bw}; "
                f"{speed:,.0f}x faster than the prefill")
        return line + ("".join(f"\n  notice: {n}" for n in x["notices"]))

    lines = [
        f"document cache: {r['model']}, weights {r['dtype']}, KV {r['kv_dtype']}, {r['threads']} thread(s), "
        f"{r['tokens']:,} prompt tokens",
        "file size".ljust(26) + f"{mib:8.1f} MiB in {r['files']} files ({r['bytes_per_token']:,} B/token, "
        f"chunks of {r['chunk_tokens']:,} tokens)",
        "prefill (no store)".ljust(26) + f"{r['prefill_s']:8.2f} s   ({r['prefill_tokens_per_s'] or 0:,.0f} tok/s): "
        "what a restore replaces",
        "prefill + save".ljust(26) + f"{r['prefill_with_save_s']:8.2f} s   save overhead "
        f"{100 * (r['save_overhead_wall'] or 0):.1f}% of the prefill (wall difference), "
        f"{100 * (r['save_overhead_thread'] or 0):.1f}% (prefill thread's time on saving); "
        f"writer thread {r['writer_s']:.2f} s in the background",
        restore_line("warm page cache", warm),
    ]
    if cold:
        lines.append(restore_line("pages dropped", cold))
    lines += [
        "opening a session".ljust(26) + f"{r['session_open_s']:8.3f} s   (fingerprint: weights stat, RoPE digest)",
        "rebuilt, not stored".ljust(26) + f"chunk means {r['chunk_means_s']:.3f} s (inside the restore), "
        f"suffix index {r['lookup_index_s']:.3f} s (first level-2 answer)",
        f"answer after restore identical to the answer after prefill: {'yes' if r['identical'] else 'NO'} "
        f"({r['answer_tokens']} tokens, level {r['level']})",
        f"targets: restore < 1 s: {'met' if warm['seconds'] < 1 else 'not met'} (warm)"
        + (f", {'met' if cold['seconds'] < 1 else 'not met'} (pages dropped)" if cold else "")
        + f"; save < 5% of prefill: {'met' if (r['save_overhead_wall'] or 0) < 0.05 else 'not met'} (wall), "
        f"{'met' if (r['save_overhead_thread'] or 0) < 0.05 else 'not met'} (thread time)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doc", type=Path, help="a text file (default: Python's documentation topics)")
    parser.add_argument("--tokens", type=int, help="cut the document to about this many tokens")
    parser.add_argument("--model", default=None)
    parser.add_argument("--weights", "--dtype", dest="weights", default="auto",
                        choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto keeps the weights as shipped (GGUF blocks); a float dtype converts them")
    parser.add_argument("--kv-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--context", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--level", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--store", type=Path, help="folder for the benchmark's store (default: next to the "
                        "document cache, on the same disk; removed at the end)")
    parser.add_argument("--no-cold", action="store_true", help="skip the restore with the pages dropped")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)


    from triforce_chat.app.runtime import open_model
    from triforce_chat.app.settings import Settings
    from triforce_chat.decoding.store.docstore import default_root

    settings = Settings(model=args.model, weights=args.weights, kv_dtype=args.kv_dtype, context=args.context,
                        level=args.level, max_new_tokens=args.max_new_tokens, threads=args.threads)
    lm = open_model(settings, log=lambda m: print(m, file=sys.stderr))
    if args.doc:
        name, text = args.doc.name, args.doc.read_text(encoding="utf-8", errors="replace")
    else:
        from pydoc_data.topics import topics

        name, text = "pydoc_topics.txt", "\n\n".join(topics[k] for k in sorted(topics))
    if args.tokens:
        ids = lm.tokenizer(text, add_special_tokens=False).input_ids[: args.tokens]
        text = lm.tokenizer.decode(ids)
    parent = args.store or default_root().parent
    parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench-doccache-", dir=parent))
    try:
        result = run(lm, settings.decode_config(), name, text, root, cold=not args.no_cold,
                     log=lambda m: print(m, file=sys.stderr))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result) if args.json else format_report(result))
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
