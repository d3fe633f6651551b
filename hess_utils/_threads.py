"""A shared thread pool for memory-bound work on the CPU.

Some CPU kernels run on one core: MKL's matrix-vector products, and float32-to-float64 conversion. Where
such work is a large share of a step (re-orthogonalisation, float64 dot products of multi-million-entry
vectors), it is split into one share per worker, each run in a thread (the kernels release the GIL), and
the partial results are combined in a fixed order, so results do not depend on thread timing.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_workers = 0


def cpu_workers() -> int:
    """Threads to split CPU work among: torch's intra-op thread count, at most 8."""
    return max(1, min(torch.get_num_threads(), 8))


def thread_pool(workers: int) -> ThreadPoolExecutor:
    """The process's pool with ``workers`` threads (rebuilt when the count changes)."""
    global _pool, _pool_workers
    with _lock:
        if _pool is None or _pool_workers != workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_workers = ThreadPoolExecutor(
                workers, thread_name_prefix="hess-cpu", initializer=_one_thread_each
            ), workers
        return _pool


def _one_thread_each() -> None:
    torch.set_num_threads(1)


_side: ThreadPoolExecutor | None = None
_side_threads = 0


def side_thread() -> ThreadPoolExecutor:
    """One worker thread for a task to run beside the caller's (e.g. a Lanczos step beside a product).

    It runs with the caller's torch thread count, so work it does splits exactly as it would in the caller
    (:func:`cpu_workers`) and gives the same numbers; rebuilt when that count changes.
    """
    global _side, _side_threads
    threads = torch.get_num_threads()
    with _lock:
        if _side is None or _side_threads != threads:
            if _side is not None:
                _side.shutdown(wait=False)
            _side, _side_threads = ThreadPoolExecutor(
                1, thread_name_prefix="hess-side", initializer=torch.set_num_threads, initargs=(threads,)
            ), threads
        return _side


def deal(sizes: list[int], workers: int, piece: int = 1) -> list[list[tuple[int, int, int]]]:
    """Deal ranges ``[0, sizes[i])`` into ``workers`` near-equal shares of ``(i, start, stop)``.

    Boundaries fall on multiples of ``piece`` within a range (except at its end); the shares depend only
    on the sizes, so the same input always gives the same split.
    """
    total = sum(sizes)
    quota = max(piece, -(-total // workers))
    quota = -(-quota // piece) * piece
    shares: list[list[tuple[int, int, int]]] = [[]]
    room = quota
    for i, n in enumerate(sizes):
        start = 0
        while start < n:
            if room == 0:
                shares.append([])
                room = quota
            stop = min(n, start + room)
            shares[-1].append((i, start, stop))
            room -= stop - start
            start = stop
    return [s for s in shares if s]
