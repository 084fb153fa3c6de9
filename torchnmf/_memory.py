"""Give the memory freed by one streamed block back to the operating system before the next.

glibc's allocator keeps freed memory for reuse: arrays up to its (dynamic) mmap threshold
come from the heap, and a heap whose freed space is fragmented, or sits below live
objects, stays resident. A streaming fit frees a block's working set (a few nnz-sized
arrays) after every block, so without a trim its resident memory ended near twice its live
peak (measured: a 300,000-row Gamma-Poisson SVI epoch, 70 MiB resident above the start for
45 MiB live at most; see benchmarks/anndata_backed.py). ``malloc_trim(0)`` returns those
pages; elsewhere (another C library, macOS, Windows) :func:`release_freed` does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Callable, Optional

__all__ = ["release_freed"]

_trim: Optional[Callable[[int], int]] = None
_looked = False


def _malloc_trim() -> Optional[Callable[[int], int]]:
    global _trim, _looked
    if not _looked:
        _looked = True
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _trim = getattr(libc, "malloc_trim", None)  # glibc only (not musl)
            except OSError:  # pragma: no cover - no C library to load
                _trim = None
    return _trim


def release_freed() -> bool:
    """Return the C heap's free pages to the system (glibc); whether it could.

    Costs a walk of the heap's free lists (about 10 ms between 4096-row blocks of a
    2000-column atlas); called by the streaming fits before each block is read.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
