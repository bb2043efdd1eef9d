"""The compute thread (app/ui/compute.py): every job on one long-lived thread, whoever submits it."""

from __future__ import annotations

import threading

import pytest

from triforce_chat.app.ui.compute import ComputeThread, compute_thread


def test_jobs_from_different_threads_run_on_one_thread_and_return_their_results():
    compute = ComputeThread(name="test-compute")
    seen: list[int] = []

    def job(x: int) -> int:
        seen.append(threading.get_ident())
        return x * 2

    results: list[int] = []
    callers = [threading.Thread(target=lambda i=i: results.append(compute.run(job, i))) for i in range(4)]
    for t in callers:
        t.start()
        t.join()  # one caller after another, as Textual's executor threads take turns
    assert sorted(results) == [0, 2, 4, 6] and compute.run(job, x=5) == 10
    assert len(set(seen)) == 1 and seen[0] == compute.ident
    assert compute.ident not in {t.ident for t in callers} and compute.ident != threading.get_ident()


def test_a_job_s_exception_reaches_the_caller_and_the_thread_goes_on():
    compute = ComputeThread(name="test-compute")

    def fails() -> None:
        raise ValueError("bad document")

    with pytest.raises(ValueError, match="bad document"):
        compute.run(fails)
    assert compute.run(lambda: threading.get_ident()) == compute.ident


def test_a_job_that_runs_another_runs_it_in_place_instead_of_waiting_for_itself():
    compute = ComputeThread(name="test-compute")
    assert compute.run(lambda: compute.run(lambda: threading.get_ident())) == compute.ident


def test_the_process_has_one_compute_thread():
    assert compute_thread() is compute_thread()
