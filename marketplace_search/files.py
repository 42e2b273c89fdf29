"""Files written whole or not at all, and their digests."""
import hashlib
import json
import os
import threading
from contextlib import contextmanager
from pathlib import Path

TEMPORARY_SUFFIX = ".tmp"  # what a writer killed mid-write leaves behind


@contextmanager
def replaced_atomically(path: Path | str, durable: bool = True):
    """A temporary path beside PATH to write, renamed over PATH when the block ends (removed if it fails):
    readers see the old file or the new one, never a part. DURABLE: fsynced, so it survives a machine crash."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}{TEMPORARY_SUFFIX}")  # one per writer
    try:
        yield temporary
        if durable:
            fsync_path(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if durable:
        fsync_path(path.parent)


def write_json_atomically(path: Path | str, value) -> None:
    with replaced_atomically(path) as temporary:
        temporary.write_text(json.dumps(value, indent=2, sort_keys=True, default=str))


def fsync_path(path: Path | str) -> None:
    """fsync a file or a folder (a folder: so a rename inside it survives a crash)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def sha256_file(path: Path | str) -> str:
    """The file's sha256, read in 1 MB blocks: how runs, archives and catalogues name their contents."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
