"""What every command that writes a folder shares: a check that the folder can be written before any heavy work, the
lock by which one run owns its output folder, and full or read-only disks reported with the folder being written.

Light to import (standard library only), so that the command line can use it before torch loads.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".ms_llava.lock"
# what a disk that cannot take the write reports, and what the user is told
_WRITE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


def check_writable(folder: str | Path, need_bytes: int = 0) -> Path:
    """Fails at once, before any weights load, when `folder` (or the parent it will be made in) cannot be written or
    holds less than `need_bytes` free. Returns the folder as a `Path`; creates nothing."""
    folder = Path(folder).expanduser()
    existing = next(parent for parent in (folder, *folder.parents) if parent.exists())
    if not existing.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, f"{existing} is a file, so {folder} cannot be made", str(folder))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, f"cannot write into {existing}: permission denied", str(folder))
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        raise OSError(errno.EROFS, f"cannot write into {existing}: the file system is read-only", str(folder))
    free = shutil.disk_usage(existing).free
    if free < need_bytes:
        raise OSError(
            errno.ENOSPC,
            f"{existing} has {free / 2**30:.2f} GiB free, {need_bytes / 2**30:.2f} GiB are needed",
            str(folder),
        )
    return folder


@contextlib.contextmanager
def writing(folder: str | Path) -> Iterator[None]:
    """Re-raises a write that the disk refuses (full, over quota, read-only, no permission) as an `OSError` that says
    so and names `folder`, the folder being written, whichever library raised it (torch and safetensors often name no
    file, or the temporary one)."""
    try:
        yield
    except OSError as error:
        if error.errno not in _WRITE_ERRNOS:
            raise
        raise OSError(error.errno, f"cannot write {folder}: {_WRITE_ERRNOS[error.errno]}", str(folder)) from error
    except Exception as error:  # safetensors' SafetensorError and torch's RuntimeError carry the OS message as text
        cause = next((code for code in _WRITE_ERRNOS if os.strerror(code) in str(error)), None)
        if cause is None:
            raise
        raise OSError(cause, f"cannot write {folder}: {_WRITE_ERRNOS[cause]}", str(folder)) from error


class FolderInUseError(RuntimeError):
    """Another live run holds the folder's lock; the message names it."""


@contextlib.contextmanager
def own_folder(folder: str | Path, command: str) -> Iterator[Path]:
    """Holds `folder/.ms_llava.lock` for the block: a second run on the same folder raises `FolderInUseError` naming
    the holder (command, process id, host, start time). The lock is the kernel's (`flock`), released when the holder
    exits in any way, so the file a killed run leaves is recognised as stale and taken over. Creates `folder`."""
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held for the block)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            try:
                holder = json.loads(handle.read())
                who = f"{holder['command']} (process {holder['pid']} on {holder['host']}, since {holder['since']})"
            except (ValueError, KeyError, TypeError):
                who = "another run"
            raise FolderInUseError(
                f"{folder} is in use by {who}; wait for it to finish or choose another output folder"
            ) from None
        handle.seek(0)
        stale = handle.read().strip()
        if stale:  # the lock was free: its holder exited without removing the file
            logging.getLogger(__name__).warning("%s: taking over the lock left by a run that ended: %s", folder, stale)
        handle.seek(0)
        handle.truncate()
        since = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(
            json.dumps({"command": command, "pid": os.getpid(), "host": socket.gethostname(), "since": since})
        )
        handle.flush()
        yield folder
    finally:
        handle.close()  # releases the lock; the file stays (removing it would race with a run taking it now)


def command_line() -> str:
    """How this process was started, for lock files and run records."""
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"
