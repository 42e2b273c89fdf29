"""Files written whole or not at all, and their digests."""
import hashlib
import json
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

TEMPORARY_SUFFIX = ".tmp"  # what a writer killed mid-write leaves behind


@contextmanager
def replaced_atomically(path: Path | str, durable: bool = True):
    """A temporary path beside PATH to write, renamed over PATH when the block ends (removed if it fails):
    readers see the old file or the new one, never a part. DURABLE: fsynced, so it survives a machine crash."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}{TEMPORARY_SUFFIX}")  # a writer's
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


@contextmanager
def folder_replaced_atomically(directory: Path | str):
    """A temporary folder beside DIRECTORY to fill; when the block ends, everything in it is fsynced and it is
    renamed onto DIRECTORY (removed if the block fails). An existing DIRECTORY is first renamed aside, then
    deleted: rename(2) cannot replace a non-empty folder, so a reader may find it missing for a moment."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=TEMPORARY_SUFFIX, dir=directory.parent))
    previous = None
    try:
        yield staging
        for path in staging.rglob("*"):
            fsync_path(path)
        os.chmod(staging, directory.stat().st_mode & 0o7777 if directory.is_dir() else 0o755)  # not mkdtemp's 0o700
        fsync_path(staging)
        if directory.exists():
            previous = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=directory.parent))
            os.replace(directory, previous)  # onto the empty folder just made: atomic, and the name is ours
        try:
            os.replace(staging, directory)
        except BaseException:
            if previous is not None:
                os.replace(previous, directory)
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_path(directory.parent)
    if previous is not None:
        shutil.rmtree(previous)


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


def path_identity(path: Path | str) -> tuple[int, ...] | None:
    """Changes when PATH is replaced (a new inode; ctime too, as an inode number can be reused); None if absent."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    return status.st_dev, status.st_ino, status.st_mtime_ns, status.st_ctime_ns, status.st_size


def sha256_file(path: Path | str) -> str:
    """The file's sha256, read in 1 MB blocks: how runs, archives and catalogues name their contents."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
