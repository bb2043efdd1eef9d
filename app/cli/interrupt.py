"""Ctrl-C during `ask`: the first one ends the answer cleanly, a second one at once.

Why not let KeyboardInterrupt fly: it lands between any two bytecodes, possibly inside a
verification window or a retrieval rebuild, and the answer printed so far would end with a
traceback instead of the one-line notice and the JSON object a script is waiting for. A stop flag
is what the TUI's Escape sets too: the decoder finishes the round it is in (so the answer ends at
the last token printed, with the session exactly as if the answer had ended there) and returns.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def first_sigint_stops(stop: Callable[[], None]) -> Iterator[None]:
    """While inside: the first SIGINT calls `stop()`, a second raises KeyboardInterrupt. Outside the
    main thread (where handlers cannot be installed) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hits = 0

    def handler(signum: int, frame: object) -> None:
        nonlocal hits
        hits += 1
        if hits > 1:
            raise KeyboardInterrupt
        stop()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
