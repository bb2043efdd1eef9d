"""Does the chat UI slow decoding down? The app against the headless `ask` loop, side by side.

One process, one loaded model, the same document and question, greedy: the headless loop (what
`ask` runs) and the real app (rendering in the terminal) answer alternately, so the load of a shared
machine falls on both alike. Both run the model on the app's compute thread (app/ui/compute.py),
where the model is opened too: it must run on one thread per process. Prints decode tokens/s of
each, the app/ask ratio per pair and the UI thread's CPU share. Run it inside a real terminal, e.g.

    tmux new -d -x 160 -y 48 'python -m triforce_chat.app.bench.tui --reps 6 --threads 1 > /tmp/ui.txt'
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
import traceback
from pathlib import Path

QUESTION = "What does the else clause of a for loop do?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--level", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="/tmp/bench_tui.txt")
    args = parser.parse_args()

    from pydoc_data.topics import topics

    from triforce_chat.app.runtime import open_model
    from triforce_chat.app.settings import Settings
    from triforce_chat.app.ui.app import TriforceApp
    from triforce_chat.app.ui.compute import compute_thread
    from triforce_chat.app.ui.history import History
    from triforce_chat.app.ui.widgets import ChatInput
    from triforce_chat.decoding.session import Session

    doc = Path(tempfile.mkdtemp()) / "python-docs.txt"
    doc.write_text("\n\n".join(f"## {k}\n\n{topics[k]}" for k in ("if", "while", "for", "try")))
    # plain greedy, given explicitly so that a model's recommended sampling does not replace it in the app
    settings = Settings(level=args.level, max_new_tokens=args.tokens).merged(
        temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, threads=args.threads
    )
    compute = compute_thread()
    lm = compute.run(open_model, settings)
    app = TriforceApp(settings, [doc], model=lm, history=History(Path(tempfile.mkdtemp())))
    rates: dict[str, list[float]] = {"ask": [], "app": []}
    ui_cpu: list[float] = []

    def ask_once(ref: Session) -> list[int]:
        ref.new_chat()
        return [t for ev in ref.generate(QUESTION) for t in ev.tokens]

    def run_ask(ref: Session) -> list[int]:
        ids = compute.run(ask_once, ref)
        rates["ask"].append(ref.stats.tokens_per_s)
        return ids

    def open_reference() -> Session:
        ref = Session(lm, settings.decode_config())
        ref.add_document(doc.name, doc.read_text())
        ref.prefill()
        return ref

    def ui_clock() -> float:  # CPU time of the UI thread (Textual cannot call a builtin directly)
        return time.thread_time()

    def run_app() -> list[int]:
        done = app.answers_done
        ui0 = app.call_from_thread(ui_clock)

        def submit() -> None:
            app.action_new_chat()
            box = app.query_one(ChatInput)
            box.insert(QUESTION)
            box.action_submit()

        app.call_from_thread(submit)
        while app.answers_done == done:
            time.sleep(0.1)
        timing = app.answer_timings[-1]
        ui_cpu.append((app.call_from_thread(ui_clock) - ui0) / timing["wall_s"])
        rates["app"].append(timing["tokens"] / timing["decode_s"])
        return app.session.turns[-1].token_ids

    def drive() -> None:
        try:
            while app.session is None or app.busy:
                time.sleep(0.2)
            ref = compute.run(open_reference)
            for rep in range(args.reps):  # alternate the order so neither always runs first
                first, second = (run_app, lambda: run_ask(ref)) if rep % 2 else (lambda: run_ask(ref), run_app)
                a, b = first(), second()
                assert a == b, "app and ask produced different tokens"
        except BaseException:
            Path(args.out).write_text(traceback.format_exc())
        finally:
            app.call_from_thread(app.exit)

    threading.Thread(target=drive, daemon=True).start()
    app.run()
    if not rates["app"]:
        return
    ratio = [b / a for a, b in zip(rates["ask"], rates["app"], strict=False)]
    lines = [
        f"{name}: decode tok/s {[round(r, 2) for r in values]} median {statistics.median(values):.2f}"
        for name, values in rates.items()
    ]
    lines.append(f"app/ask per pair: {[round(r, 3) for r in ratio]} median {statistics.median(ratio):.3f}")
    lines.append(f"UI thread CPU share while answering: median {statistics.median(ui_cpu):.3f}")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
