"""The one thread that runs the chat's model work: loading, prefill and answers.

Why one thread: torch's CPU operations and our kernels run their parallel loops on OpenMP, and GNU
OpenMP (the runtime of torch's Linux wheels) gives every thread that starts parallel work a pool of
worker threads of its own, kept until that thread ends. Textual runs `@work(thread=True)` workers on
asyncio's default executor, whose threads take turns and live on. Once two of them had run the
model, the process held two pools of `threads` threads each: more threads than CPUs. libgomp then
stops spinning at its barriers, so every parallel region put its threads to sleep and woke them
through the kernel (about 5,000 context switches a second on 2 cores), and the chat decoded 16-22%
slower than it does on one thread (2 threads, side by side; docs/performance.md, "The chat decoded
slower than ask").

So the app's workers hand their job to this thread and wait for it: whichever executor thread
Textual picks, the model only ever runs here, and the process keeps one pool. The UI thread must
not run the model either (it would start a second pool).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class ComputeThread:
    """A single long-lived thread; `run` executes a function on it and returns what it returns."""

    def __init__(self, name: str = "triforce-compute") -> None:
        # one worker, created on the first job and kept: an idle executor thread waits for the next
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._ident: int | None = None

    def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Call `fn(*args, **kwargs)` on the compute thread; the caller waits. Its exception is
        raised here. Called from the compute thread itself (a job that runs another), it runs in
        place, since waiting for the queue there would wait forever."""
        if threading.get_ident() == self._ident:
            return fn(*args, **kwargs)
        return self._executor.submit(self._call, fn, args, kwargs).result()

    @property
    def ident(self) -> int | None:
        """The thread's identifier once it has run a job (None before)."""
        return self._ident

    def _call(self, fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
        self._ident = threading.get_ident()
        return fn(*args, **kwargs)


_the_thread: ComputeThread | None = None
_lock = threading.Lock()


def compute_thread() -> ComputeThread:
    """The process's compute thread. One per process, not per app: the OpenMP pools it exists to
    bound are per process (tests open many apps in one)."""
    global _the_thread
    with _lock:
        if _the_thread is None:
            _the_thread = ComputeThread()
        return _the_thread
