"""Disk space: refuse a large write that would not fit before the work that makes it, and tell a full disk (or
quota) apart from other write errors, whichever library re-raised it."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from bcpkd_cli.errors import BcpkdError, BcpkdFailure

FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


def out_of_space(err: BaseException | None) -> str | None:
    """Why a write failed when `err` or an error it arose from says the disk is full: "no space left on device" or
    "disk quota exceeded" (an OSError's errno, or the message of one re-raised by safetensors as SafetensorError
    or by torch.save as RuntimeError); None for any other error."""
    for _ in range(8):  # along __cause__ / __context__
        if err is None:
            return None
        if isinstance(err, OSError) and err.errno in FULL_DISK:
            return os.strerror(err.errno).lower()
        said = [code for code in FULL_DISK if os.strerror(code).lower() in str(err).lower()]
        if said:
            return os.strerror(said[0]).lower()
        err = err.__cause__ or err.__context__
    return None


def full_disk_failure(path: Path, err: BaseException, size: int | None = None) -> BcpkdFailure | None:
    """The one-line failure for writing `path` (about `size` bytes, when known) when `err` says the disk is full;
    None for any other error."""
    reason = out_of_space(err)
    if reason is None:
        return None
    needed = f" (needed about {format_bytes(size)})" if size else ""
    return BcpkdFailure(f"writing {path}: {reason}{needed}; free space and run again")


def format_bytes(size: float, unit_of: float | None = None) -> str:
    """1234567 -> "1.23 MB" (decimal units), in the unit that suits `unit_of` (default: `size` itself)."""
    scale = unit_of if unit_of is not None else size
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if scale >= factor:
            return f"{size / factor:.2f} {unit}"
    return f"{int(size)} bytes"


def free_bytes(folder: Path) -> int:
    """Free bytes (as an unprivileged user sees them) on the file system of `folder`, or of its nearest existing
    parent when it is not there yet."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def with_margin(size: int) -> int:
    """What a write of `size` bytes should find free: 1% more plus 16 MB, for headers and the file system."""
    return size + size // 100 + (16 << 20)


def require_space(folder: Path, size: int, what: str, fix: str) -> None:
    """Refuse (BcpkdError) a write of about `size` bytes into `folder` that would not fit (`with_margin`),
    saying what needs how much, where, how much is free and `fix`."""
    needed, free = with_margin(size), free_bytes(folder)
    if free < needed:
        raise BcpkdError(f"{what} needs {format_bytes(needed)} in {folder} but only {format_bytes(free, needed)} "
                         f"is free there; {fix}")
