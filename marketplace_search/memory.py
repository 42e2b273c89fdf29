"""Let the photo model's forward passes reuse freed memory instead of faulting it in anew on every batch.

glibc's malloc serves an allocation above its mmap threshold (32 MiB at most) with a fresh mmap and
hands it back to the kernel when it is freed, and trims the top of its heap as soon as enough of it is
free. A CNN's activations are large (one 32-channel 130 x 130 float map of a batch of 32 is 69 MB), so
every layer of every batch touches pages the kernel must zero again: embedding the real listings on 2
cores spent 27 s of its 72 s CPU time in the kernel (10.7M page faults for 256 photos), and a served
batch of 8 photos (torch fp32) faulted 64-92k pages in per forward pass. Serving every allocation from
the heap (M_MMAP_MAX 0) and trimming it only above 1 GiB free (M_TRIM_THRESHOLD) keeps those pages:
6.7 -> 10.8 photos/s embedding, the same peak memory (README, "Train on the real listings"). The training
stages and the Ray embedding actors call it: jobs that end. The handler does not: in a serving worker,
which runs for days, it also cut a torch fp32 batch of 8 by a median 13 %, but the worker grew ~2 MB per
1,000 mixed requests without end, where with malloc's defaults it stays flat (README, "Benchmarks": soak). PyTorch's CPU
performance guide reaches the same end by preloading jemalloc or tcmalloc; this needs nothing installed.

It changes nothing where malloc is not glibc's, or where the user set glibc's own MALLOC_* tunables
or preloaded another allocator: theirs win.
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
