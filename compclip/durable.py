"""Files that are either there whole or not there: the one temp-file-and-rename helper of the project.

A reader (a resumed run, a concurrent evaluation, a person) sees the old file or the new one, never a torn one: the
content goes to a temporary name in the same folder, is flushed and fsynced, then renamed over the target (a rename
is atomic within a file system), and the folder is fsynced so that the rename itself survives a power loss.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Union

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
