"""Which thread runs torch's CPU work, and with how many intra-op threads.

With OpenMP (torch's CPU backend), every thread that runs a parallel torch operation gets its own
pool of worker threads, which lives until that thread ends, and ``torch.set_num_threads`` sets the
calling thread's count only. Once the pools together hold more threads than there are cores, libgomp
stops letting idle workers spin between parallel regions, and every region then waits for a sleeping
worker to wake. A process that runs its inference on one thread (a service's worker) should therefore
keep every other thread from growing a pool: measured on 2 cores with the real DINOv2 ViT-S/14, an
engine thread beside a main thread that had built a pool embedded in 84 ms and reranked 36
candidates in 8.7 ms; with no other pool, 66 ms and 5.0 ms.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, TypeVar

import torch

T = TypeVar("T")


def use_torch_threads(threads: int | None) -> None:
    """Give the calling thread ``threads`` intra-op threads (None: leave torch's default)."""
    if threads is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """The calling thread's intra-op threads set to ``threads`` (at most its current count) for the block,
    restored after: for work made of many small operations, where waking workers costs more than they
    bring."""
    before = torch.get_num_threads()
    if threads >= before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def single_threaded() -> None:
    """Run the calling thread's torch work on itself alone, so that it never grows a pool of its own:
    for threads that do a little torch work beside an inference thread (request handlers)."""
    use_torch_threads(1)


def run_on_own_thread(fn: Callable[[], T], threads: int | None = None, name: str = "torch-work") -> T:
    """``fn()`` on a new thread with ``threads`` intra-op threads, its result or its exception; the
    OpenMP pool that the work grows ends with that thread instead of staying on the caller's."""
    out: dict[str, object] = {}

    def target() -> None:
        use_torch_threads(threads)
        try:
            out["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - handed to the caller as is
            out["error"] = err

    worker = threading.Thread(target=target, name=name)
    worker.start()
    worker.join()
    if "error" in out:
        raise out["error"]  # type: ignore[misc]
    return out["value"]  # type: ignore[return-value]
