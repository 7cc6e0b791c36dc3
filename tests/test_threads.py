"""reranker.threads: torch work on a thread of its own, and request threads kept to one torch thread."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from reranker.threads import run_on_own_thread, single_threaded, use_torch_threads


def test_run_on_own_thread_returns_the_value_on_another_thread_with_its_thread_count():
    before = torch.get_num_threads()
    caller = threading.get_ident()
    ident, threads = run_on_own_thread(lambda: (threading.get_ident(), torch.get_num_threads()), threads=1)
    assert ident != caller and threads == 1
    assert torch.get_num_threads() == before  # the caller's count is its own


def test_run_on_own_thread_raises_the_work_s_own_exception():
    def fail() -> None:
        raise KeyError("the work's error")

    with pytest.raises(KeyError, match="the work's error"):
        run_on_own_thread(fail)


def test_single_threaded_changes_the_calling_thread_only():
    before = torch.get_num_threads()
    assert run_on_own_thread(lambda: (single_threaded(), torch.get_num_threads())[1]) == 1
    assert torch.get_num_threads() == before
    use_torch_threads(None)  # None leaves the count as it is
    assert torch.get_num_threads() == before


def test_request_threads_run_torch_single_threaded():
    from service.routes import off_loop

    assert asyncio.run(off_loop(torch.get_num_threads)) == 1
    assert asyncio.run(off_loop(lambda a, b: a + b, 2, 3)) == 5
