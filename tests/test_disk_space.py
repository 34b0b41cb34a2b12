"""A full disk: a BCP cache that would not fit is refused before any teacher inference (exit 2), and a write that
runs out of space is one line naming the file (exit 1), leaving nothing half-written."""

from __future__ import annotations

import errno
import io
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from bcpkd_cli import artifacts, calibration, diskspace
from bcpkd_cli.choices import CacheDtype
from bcpkd_cli.cli import main
from bcpkd_cli.config import CalibrateConfig
from bcpkd_cli.errors import BcpkdError, BcpkdFailure
from cli_helpers import here

pytestmark = pytest.mark.usefixtures("single_thread")

TINY = ["--set", "data.n_train=300", "--set", "data.n_heldout=100", "--set", "data.n_test=100",
        "--set", "teacher.hidden=[16]", "--set", "teacher.epochs=1", "--set", "distill.hidden=[8]",
        "--set", "distill.epochs=1", "--set", "teacher.laplace.grid_size=3", "--device", "cpu"]
NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"


def run_here(*args: str, cwd: Path) -> tuple[int, str]:
    """The CLI in this process: (exit code, stderr)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        patch.setattr(sys, "argv", ["bcpkd", *args])
        stderr = io.StringIO()
        patch.setattr(sys, "stderr", stderr)
        with pytest.raises(SystemExit) as exit_info:
            main()
    return exit_info.value.code, stderr.getvalue()


def disk_with(free: int, seen: list[Path] | None = None):
    """A stand-in for shutil.disk_usage: a 1 TB disk with `free` bytes free (noting the folders asked about)."""
    def disk_usage(folder):
        if seen is not None:
            seen.append(Path(folder))
        return shutil._ntuple_diskusage(10**12, 10**12 - free, free)
    return disk_usage


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    work = tmp_path_factory.mktemp("disk")
    return work, work / here("train-teacher", "--bayes", "laplace", "--out", "t", *TINY, cwd=work).strip()


@pytest.mark.parametrize("dtype, per_value", [(CacheDtype.float32, 4), (CacheDtype.float16, 2)])
def test_cache_bytes_is_the_size_of_the_cache_tensors(dtype, per_value):
    cfg = replace(CalibrateConfig(), cache_dtype=dtype, views=3)
    n, v, c = 1000, 3, 100
    assert calibration.cache_bytes(n, c, cfg) == n * v * c * per_value  # probs [N, V, C]
    assert calibration.cache_bytes(n, c, replace(cfg, draws=8)) == n * v * 8 * c * per_value  # [N, V, K, C]
    assert calibration.cache_bytes(n, c, replace(cfg, top_k=10)) == n * v * 10 * (per_value + 4)  # + int32 ids
    assert calibration.cache_bytes(n, 5, replace(cfg, top_k=10)) == n * v * 5 * (per_value + 4)  # K at most C


def test_free_space_is_asked_of_the_nearest_existing_folder(tmp_path, monkeypatch):
    seen: list[Path] = []
    monkeypatch.setattr(shutil, "disk_usage", disk_with(123, seen))
    assert diskspace.free_bytes(tmp_path / "a" / "b") == 123 and seen == [tmp_path]
    with pytest.raises(BcpkdError) as refused:
        diskspace.require_space(tmp_path / "a", 2_400_000_000, "the BCP cache", "free space")
    assert str(refused.value) == f"the BCP cache needs 2.44 GB in {tmp_path / 'a'} but only 0.00 GB is free " \
                                 f"there; free space"
    monkeypatch.setattr(shutil, "disk_usage", disk_with(diskspace.with_margin(10**9)))
    diskspace.require_space(tmp_path, 10**9, "the BCP cache", "free space")  # fits with its margin


def test_a_cache_that_does_not_fit_is_refused_before_inference(teacher, monkeypatch):
    work, teacher_path = teacher
    seen: list[Path] = []
    monkeypatch.setattr(shutil, "disk_usage", disk_with(1_000_000, seen))
    monkeypatch.setattr(calibration, "load_teacher", lambda *a: pytest.fail("the teacher ran before the check"))
    code, stderr = run_here("calibrate", "--teacher", str(teacher_path), "--out", "c", *TINY, cwd=work)
    folder = (work / "c").resolve()
    needed = diskspace.with_margin(300 * 1 * 5 * 4 + teacher_path.stat().st_size)
    assert code == 2 and "Traceback" not in stderr
    assert stderr.splitlines()[-1] == (
        f"error: the BCP cache needs {needed / 1e6:.2f} MB in {folder} but only 1.00 MB is free there; free space, "
        f"build it elsewhere (calibrate --out DIR; distill --cache DIR/bcp.safetensors), or make it smaller "
        f"(calibrate.top_k=K, calibrate.cache_dtype=float16)")
    assert seen == [folder]
    assert [p.name for p in folder.iterdir()] == [".lock"]  # no cache, no calibrated teacher, no temporary file
    code, stderr = run_here("distill", "--teacher", str(teacher_path), "--out", "s", *TINY, cwd=work)
    assert code == 2 and stderr.splitlines()[-1].startswith("error: the BCP cache needs ")
    assert not (work / "s" / "student.pt").exists()


def test_the_next_run_with_space_builds_the_cache_of_the_size_checked(teacher):
    work, teacher_path = teacher
    path = Path(here("calibrate", "--teacher", str(teacher_path), "--out", "c", "--set", "calibrate.cache_dtype=float16",
                     *TINY, cwd=work).strip())
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    cfg = replace(CalibrateConfig(), cache_dtype=CacheDtype.float16)
    assert path.stat().st_size - 8 - header == calibration.cache_bytes(300, 5, cfg) == 300 * 1 * 5 * 2
    probs, _ = artifacts.load_cache(path, {})
    assert probs.shape == (300, 1, 5) and probs.dtype == torch.float16


def full_disk(error: BaseException):
    """A writer that writes part of its file, then fails with `error`."""
    def write(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        raise error
    return write


def torch_save_error() -> RuntimeError:
    """What torch.save raises on a full disk: a RuntimeError arising from the OSError."""
    try:
        try:
            raise OSError(errno.ENOSPC, NO_SPACE)
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    except RuntimeError as err:
        return err


@pytest.mark.parametrize("error, reason", [
    (OSError(errno.ENOSPC, NO_SPACE), "no space left on device"),
    (OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), "disk quota exceeded"),
    (SafetensorError(f"Error while serializing: I/O error: {NO_SPACE} (os error 28)"), "no space left on device"),
    (torch_save_error(), "no space left on device"),
])
def test_a_full_disk_is_one_line_naming_the_file(tmp_path, error, reason):
    path = tmp_path / "teacher.pt"
    path.write_bytes(b"the old teacher")
    with pytest.raises(BcpkdFailure) as failed:
        artifacts.atomic_write(path, full_disk(error), size=2_500_000)
    assert str(failed.value) == f"writing {path}: {reason} (needed about 2.50 MB); free space and run again"
    assert [p.name for p in tmp_path.iterdir()] == ["teacher.pt"] and path.read_bytes() == b"the old teacher"


@pytest.mark.parametrize("error", [OSError(errno.EACCES, "Permission denied"), RuntimeError("another failure"),
                                   SafetensorError("another failure")])
def test_other_write_errors_pass_through(tmp_path, error):
    with pytest.raises(type(error)):
        artifacts.atomic_write(tmp_path / "x.pt", full_disk(error))
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_when_taking_the_lock_is_one_line(tmp_path, monkeypatch):
    def mkdir(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, NO_SPACE)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    lock = tmp_path / "bcp" / "key" / ".lock"
    with pytest.raises(BcpkdFailure) as failed, artifacts.exclusive_lock(lock, "waiting"):
        pass
    assert str(failed.value) == f"writing {lock}: no space left on device; free space and run again"


def test_a_full_disk_while_writing_the_cache_fails_in_one_line_and_the_next_run_recovers(teacher, monkeypatch):
    work, teacher_path = teacher

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise SafetensorError(f"Error while serializing: I/O error: {NO_SPACE} (os error 28)")

    monkeypatch.setattr(artifacts, "save_file", save_file)
    code, stderr = run_here("calibrate", "--teacher", str(teacher_path), "--out", "full", *TINY, cwd=work)
    cache = (work / "full").resolve() / "bcp.safetensors"
    assert code == 1 and "Traceback" not in stderr
    assert stderr.splitlines()[-1] == f"failed: writing {cache}: no space left on device (needed about 6.00 kB); " \
                                      f"free space and run again"
    assert not cache.exists() and not [p for p in cache.parent.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    again = Path(here("calibrate", "--teacher", str(teacher_path), "--out", "full", *TINY, cwd=work).strip())
    assert again == cache and artifacts.load_cache(cache, {})[0].shape == (300, 1, 5)
