"""Let the photo model's forward passes reuse freed memory instead of faulting it in anew on every batch.

A CNN's activations exceed glibc malloc's mmap threshold, so every batch maps, zeroes and unmaps them
again; served from a heap trimmed only above 1 GiB free, they stay. For jobs that end (the training
stages, Ray embedding), not serving workers, whose heap would keep growing. A user's MALLOC_* tunables
or preloaded allocator win.
"""
import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1  # mallopt parameters, <malloc.h>
M_MMAP_MAX = -4
TRIM_THRESHOLD = 1 << 30
USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES",
                 "LD_PRELOAD")


def keep_freed_memory() -> bool:
    """Set glibc malloc to keep freed blocks for reuse (see the module); True when it was set."""
    if any(os.environ.get(name) for name in USER_SETTINGS):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        libc = None
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False  # not glibc (musl, macOS, Windows)
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
