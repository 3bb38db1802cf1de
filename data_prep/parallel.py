"""Ordered parallel map over spawned worker processes, shared by the corpus builder and the converters."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial


@contextmanager
def ordered_map(workers: int, chunksize: int = 1) -> Iterator[Callable]:
    """``map`` in this process, or an ordered ``imap`` over ``workers`` spawned processes.

    Spawned, not forked: eSpeak NG and FFmpeg keep global state that must not be shared with
    a parent. The pool is stopped on exit, whether every result was consumed or the caller failed.
    """
    if workers <= 1:
        yield map
        return
    pool = multiprocessing.get_context("spawn").Pool(workers)
    try:
        yield partial(pool.imap, chunksize=chunksize)
    finally:
        pool.terminate()
        pool.join()
