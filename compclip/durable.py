"""Files that are either there whole or not there: the one temp-file-and-rename helper of the project, and the
fsync and checksum of files that others wrote (DeepSpeed's shards).

A reader (a resumed run, a concurrent evaluation, a person) sees the old file or the new one, never a torn one: the
content goes to a temporary name in the same folder, is flushed and fsynced, then renamed over the target (a rename
is atomic within a file system), and the folder is fsynced so that the rename itself survives a power loss.

`checksum` is what a checkpoint's completion marker records per file, and what `--resume` verifies. It is zlib's
CRC-32, with the size: it has to catch torn writes and bit rot, not tampering (whoever can write the run folder can
rewrite the marker too), so a cryptographic hash buys nothing; CRC-32 is in the standard library, releases the GIL,
and is the fastest hash the standard library has (on the project's 2-core CI machine, with zlib 1.2.13: 1.8 GB/s,
against 1.3 for SHA-256 and 0.7 for BLAKE2b), faster than most shared file systems read. The size catches
truncation exactly; a random corruption of a same-sized file passes CRC-32 with probability 2^-32. Each rank
checksums only the files it wrote, from the page cache right after writing them, and verifies only its share of a
tag's files at resume (compclip.trainer.checkpoint), so a multi-GB shard costs each rank its share / ~2 GB/s.
"""
from __future__ import annotations

import errno
import os
import stat
import zlib
from pathlib import Path
from typing import Callable, Tuple, Union

PathLike = Union[str, "os.PathLike[str]"]


def fsync_dir(folder: PathLike) -> None:
    """Make the entries of `folder` (renames, new files) durable. A no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (e.g. certain network mounts) refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def fsync_file(path: PathLike) -> None:
    """Flush a file someone else wrote (DeepSpeed's shards) to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: PathLike) -> None:
    """`fsync_dir` of `folder` and of every folder below it (their entries: the files written into them)."""
    for parent, _, _ in os.walk(folder):
        fsync_dir(parent)


CHECKSUM = "crc32"
"""The name of `checksum`'s hash, as a completion marker records it."""
_BLOCK = 16 << 20


def open_regular(path: PathLike) -> int:
    """A read-only descriptor of the regular file `path`; OSError for anything else (a folder, or a FIFO or
    device, which would block or never end a read), without blocking on a FIFO to find out."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return fd


def read_bounded(path: PathLike, limit: int) -> bytes:
    """The content of the regular file `path` (`open_regular`); OSError when it holds more than `limit` bytes
    (a small record that has grown that much is damage, and is refused unread)."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise OSError(errno.EFBIG, f"{size} bytes, more than the {limit} such a file can be", str(path))
        with os.fdopen(os.dup(fd), "rb") as handle:
            return handle.read(limit + 1)
    finally:
        os.close(fd)


def checksum(path: PathLike) -> Tuple[int, str]:
    """(size in bytes, CRC-32 as 8 hex digits) of the regular file `path` (module docstring: why CRC-32).
    Raises OSError for anything else (`open_regular`)."""
    fd = open_regular(path)
    try:
        crc, size = 0, 0
        while True:
            block = os.read(fd, _BLOCK)
            if not block:
                break
            crc, size = zlib.crc32(block, crc), size + len(block)
    finally:
        os.close(fd)
    return size, f"{crc:08x}"


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_with(path: PathLike, write: Callable[[object], None], binary: bool = False) -> None:
    """Call `write(handle)` on a temporary file next to `path`, then fsync and rename it into place."""
    path = Path(path)
    temporary = _temporary(path)
    try:
        with open(temporary, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"})) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text(path: PathLike, text: str) -> None:
    """`text` into `path` atomically and durably."""
    write_with(path, lambda handle: handle.write(text))


def torch_save(obj, path: PathLike) -> None:
    """`torch.save(obj)` into `path` atomically and durably."""
    import torch

    write_with(path, lambda handle: torch.save(obj, handle), binary=True)
