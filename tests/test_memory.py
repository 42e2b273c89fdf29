"""marketplace_search.memory: freed memory reused by the jobs that set it; user settings win; workers untouched."""
import json
import os
import subprocess
import sys

import pytest

from tests.serving_fixtures import archive_tiny_run, extract_archive, make_tiny_run

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")]

# A fresh interpreter allocates and frees a 64 MiB tensor 20 times and prints the last 10's page faults.
LOOP = """
import json, resource, sys
import torch
from marketplace_search.memory import keep_freed_memory
applied = None
if sys.argv[1] == "keep":
    applied = keep_freed_memory()
elif sys.argv[1] == "handler":
    from handlers.local import load_local_handler
    load_local_handler(sys.argv[2])
for _ in range(10):
    torch.ones(16 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(16 << 20)
print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""
PAGES = (64 << 20) // 4096  # one 64 MiB block's pages


def run_loop(mode: str, *arguments: str, **environment) -> dict:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("MALLOC_") and key not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", LOOP, mode, *arguments], env={**env, **environment},
                         capture_output=True, text=True, check=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_tensors_are_reused_instead_of_faulted_in_again_unless_the_user_set_malloc():
    default, kept = run_loop("default"), run_loop("keep")
    assert kept["applied"] is True
    assert default["faults"] > 9 * PAGES  # glibc alone: a fresh mmap per tensor, every page faulted in again
    assert kept["faults"] < PAGES // 4  # kept: the same pages every time
    assert run_loop("keep", MALLOC_MMAP_MAX_="65536")["applied"] is False
    assert run_loop("keep", GLIBC_TUNABLES="glibc.malloc.trim_threshold=1")["applied"] is False


def test_the_handlers_process_keeps_mallocs_defaults(tmp_path):
    run = make_tiny_run(tmp_path / "runs" / "2025-01-31_142233")
    model = extract_archive(archive_tiny_run(run, tmp_path / "store"), tmp_path / "model")
    served = run_loop("handler", str(model))
    assert served["applied"] is None and served["faults"] > 9 * PAGES  # glibc's own: each block mapped afresh
