"""training.memory: freed tensor memory is reused, not faulted in anew; the user's allocator settings win."""
import json
import os
import subprocess
import sys

import pytest

# A fresh interpreter allocates and frees a 64 MiB tensor 20 times (a CNN's activation at batch 32 is of
# that size), then prints whether keep_freed_memory set malloc and the page faults the last 10 took (the
# heap settles within the first few).
LOOP = """
import json, resource, sys
import torch
from training.memory import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
for _ in range(10):
    torch.ones(16 << 20)  # 16M float32 = 64 MiB, written, then freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(16 << 20)
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""
PAGES = (64 << 20) // 4096  # one 64 MiB block's pages


def run_loop(mode: str, **environment) -> dict:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("MALLOC_") and key not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", LOOP, mode], env={**env, **environment}, capture_output=True,
                         text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_freed_tensors_are_reused_instead_of_faulted_in_again():
    default, kept = run_loop("default"), run_loop("keep")
    assert kept["applied"] is True
    assert default["faults"] > 9 * PAGES  # glibc alone: a fresh mmap per tensor, every page faulted in again
    assert kept["faults"] < PAGES // 4  # kept: the same pages every time


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_the_users_own_malloc_settings_are_left_alone():
    assert run_loop("keep", MALLOC_MMAP_MAX_="65536")["applied"] is False
    assert run_loop("keep", GLIBC_TUNABLES="glibc.malloc.trim_threshold=1")["applied"] is False
