"""Checkpoints and the BCP cache: atomic writes, safe loads, refusals that name the file."""

from __future__ import annotations

import os
import pathlib

import pytest
import torch

from bcpkd_cli import artifacts
from bcpkd_cli.artifacts import CACHE_FORMAT, STUDENT_FORMAT, TEACHER_FORMAT, VERSION
from bcpkd_cli.errors import BcpkdError


def _payload(**extra):
    return {"format": TEACHER_FORMAT, "version": VERSION, "bayes": "none",
            "model": {"arch": "mlp", "input_shape": [3], "n_classes": 2, "hidden": [4]},
            "state_dict": {"w": torch.arange(6.0).view(2, 3), "b": torch.tensor([1, 2], dtype=torch.int64)},
            "history": {"steps": 3, "heldout": {"nll": 0.5}}, "parent_sha256": None, **extra}


def _leftover_temp_files(folder: pathlib.Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_checkpoint_round_trip(tmp_path):
    path = artifacts.save_checkpoint(tmp_path / "sub" / "teacher.pt", _payload())
    assert path == tmp_path / "sub" / "teacher.pt" and path.is_file()
    loaded = artifacts.load_checkpoint(path, TEACHER_FORMAT)
    assert loaded["format"] == TEACHER_FORMAT and loaded["version"] == VERSION
    assert torch.equal(loaded["state_dict"]["w"], torch.arange(6.0).view(2, 3))
    assert loaded["state_dict"]["b"].dtype == torch.int64
    assert loaded["history"] == {"steps": 3, "heldout": {"nll": 0.5}} and loaded["parent_sha256"] is None
    # plain tensors and values only: torch's safe loader reads it on its own
    assert torch.load(path, weights_only=True)["model"]["hidden"] == [4]
    assert _leftover_temp_files(path.parent) == []


def test_load_checkpoint_accepts_any_of_several_formats(tmp_path):
    path = artifacts.save_checkpoint(tmp_path / "s.pt", _payload(format=STUDENT_FORMAT))
    assert artifacts.load_checkpoint(path, (TEACHER_FORMAT, STUDENT_FORMAT))["format"] == STUDENT_FORMAT


def test_missing_checkpoint(tmp_path):
    path = tmp_path / "absent.pt"
    with pytest.raises(BcpkdError) as info:
        artifacts.load_checkpoint(path, TEACHER_FORMAT)
    assert str(path) in str(info.value) and "bcpkd train-teacher" in str(info.value)


def test_random_bytes_are_refused(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).tolist()))
    with pytest.raises(BcpkdError) as info:
        artifacts.load_checkpoint(path, TEACHER_FORMAT)
    assert str(path) in str(info.value) and "not a readable bcpkd checkpoint" in str(info.value)


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(BcpkdError, match="not a readable bcpkd checkpoint"):
        artifacts.load_checkpoint(path, TEACHER_FORMAT)


def test_wrong_format_key(tmp_path):
    path = tmp_path / "student.pt"
    torch.save(_payload(format=STUDENT_FORMAT), path)
    with pytest.raises(BcpkdError) as info:
        artifacts.load_checkpoint(path, TEACHER_FORMAT)
    message = str(info.value)
    assert str(path) in message and "expected a bcpkd.teacher checkpoint, found 'bcpkd.student'" in message


def test_torch_file_that_is_not_a_dict(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(BcpkdError) as info:
        artifacts.load_checkpoint(path, TEACHER_FORMAT)
    assert str(path) in str(info.value) and "found 'Tensor'" in str(info.value)


def test_wrong_version(tmp_path):
    path = tmp_path / "old.pt"
    torch.save(_payload(version=VERSION + 1), path)
    with pytest.raises(BcpkdError) as info:
        artifacts.load_checkpoint(path, TEACHER_FORMAT)
    message = str(info.value)
    assert str(path) in message and f"version {VERSION + 1} is not {VERSION}" in message


class _Sneaky:
    """A pickle that would create a file when unpickled with the full (unsafe) unpickler."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_checkpoint_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": TEACHER_FORMAT, "version": VERSION, "x": _Sneaky(marker)}, path)
    with pytest.raises(BcpkdError) as info:
        artifacts.load_checkpoint(path, TEACHER_FORMAT)
    assert str(path) in str(info.value)
    assert not marker.exists()


def test_atomic_write_replaces_on_success(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    artifacts.write_text(path, "new")
    assert path.read_text() == "new"
    assert _leftover_temp_files(tmp_path) == []


def test_atomic_write_keeps_old_file_when_the_writer_raises(tmp_path):
    path = tmp_path / "teacher.pt"
    path.write_text("old contents")

    def half_write(tmp: pathlib.Path) -> None:
        assert tmp.parent == tmp_path and tmp != path  # writes go to a temp file beside the target
        tmp.write_text("half")
        raise KeyboardInterrupt  # a killed job, not only an Exception

    with pytest.raises(KeyboardInterrupt):
        artifacts.atomic_write(path, half_write)
    assert path.read_text() == "old contents"
    assert sorted(os.listdir(tmp_path)) == ["teacher.pt"]


def test_atomic_write_of_a_new_file_leaves_nothing_on_failure(tmp_path):
    def fail(tmp: pathlib.Path) -> None:
        tmp.write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError):
        artifacts.atomic_write(tmp_path / "new.pt", fail)
    assert os.listdir(tmp_path) == []


def test_sha256_file(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abc")
    assert artifacts.sha256_file(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def _probs(n: int = 7, c: int = 4, dtype=torch.float32) -> torch.Tensor:
    logits = torch.randn(n, 1, c, generator=torch.Generator().manual_seed(n))
    return torch.softmax(logits.double(), dim=-1).to(dtype)


META = {"teacher_sha256": "ab" * 32, "data_fingerprint": "0123456789abcdef", "t_teacher": 2.0, "n_examples": 7,
        "views": {"count": 1, "augmentation": "none"}, "bayes": "laplace", "samples": None, "split": "train"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cache_round_trip(tmp_path, dtype):
    probs = _probs(dtype=dtype)
    path = artifacts.save_cache(tmp_path / "bcp" / "bcp.safetensors", probs, META)
    loaded, meta = artifacts.load_cache(path, {"data_fingerprint": "0123456789abcdef", "t_teacher": 2.0,
                                               "n_examples": 7})
    assert loaded.dtype == dtype and loaded.shape == (7, 1, 4)
    assert torch.equal(loaded, probs)
    assert meta == META
    assert artifacts.read_cache_metadata(path) == META


def test_cache_with_a_mismatching_expected_key(tmp_path):
    path = artifacts.save_cache(tmp_path / "bcp.safetensors", _probs(), META)
    with pytest.raises(BcpkdError) as info:
        artifacts.load_cache(path, {"data_fingerprint": "fedcba9876543210"})
    message = str(info.value)
    assert str(path) in message and "data_fingerprint" in message and "fedcba9876543210" in message
    with pytest.raises(BcpkdError, match="t_teacher"):
        artifacts.load_cache(path, {"t_teacher": 1.0})
    with pytest.raises(BcpkdError, match="absent_key"):
        artifacts.load_cache(path, {"absent_key": 1})


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_cache_rows_not_summing_to_one(tmp_path, dtype):
    probs = _probs(dtype=dtype)
    probs[3, 0] *= 0.9
    path = artifacts.save_cache(tmp_path / "bcp.safetensors", probs, META)
    with pytest.raises(BcpkdError) as info:
        artifacts.load_cache(path, {})
    assert str(path) in str(info.value) and "do not sum to 1" in str(info.value)


def test_cache_that_is_not_n_v_c(tmp_path):
    path = artifacts.save_cache(tmp_path / "bcp.safetensors", _probs()[:, 0, :], META)
    with pytest.raises(BcpkdError, match="do not sum to 1"):
        artifacts.load_cache(path, {})


def test_missing_and_foreign_caches(tmp_path):
    with pytest.raises(BcpkdError, match="no such BCP cache"):
        artifacts.load_cache(tmp_path / "absent.safetensors", {})
    not_safetensors = tmp_path / "teacher.safetensors"
    torch.save(_payload(), not_safetensors)
    with pytest.raises(BcpkdError) as info:
        artifacts.load_cache(not_safetensors, {})
    assert str(not_safetensors) in str(info.value)
    # a safetensors file of another format
    from safetensors.torch import save_file

    other = tmp_path / "other.safetensors"
    save_file({"probs": _probs()}, str(other), metadata={"format": "something.else", "version": "1"})
    with pytest.raises(BcpkdError, match=f"not a {CACHE_FORMAT} v{VERSION} file"):
        artifacts.load_cache(other, {})


def test_new_run_dir(tmp_path, monkeypatch):
    assert artifacts.new_run_dir(str(tmp_path / "given"), "x") == tmp_path / "given"
    monkeypatch.chdir(tmp_path)
    first = artifacts.new_run_dir("", "teacher")
    assert first.parent == pathlib.Path("runs") and first.name.startswith("teacher-")
    first.mkdir(parents=True)
    second = artifacts.new_run_dir("", "teacher")
    assert second != first and not second.exists()


def test_artifacts_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        checkpoint = artifacts.save_checkpoint(tmp_path / "teacher.pt", _payload())
        report = artifacts.write_json(tmp_path / "report.json", {"a": 1})
        cache = artifacts.save_cache(tmp_path / "bcp.safetensors", _probs(), META)
    finally:
        os.umask(old)
    for path in (checkpoint, report, cache):
        assert path.stat().st_mode & 0o777 == 0o644, f"{path.name}: {oct(path.stat().st_mode & 0o777)}"


def test_cache_is_memory_mapped_not_read_into_memory(tmp_path):
    """Loading (and checking) a 40 MB cache leaves the process's private memory nearly unchanged."""
    def anon_mb() -> float:
        line = next(l for l in pathlib.Path("/proc/self/status").read_text().splitlines() if l.startswith("RssAnon:"))
        return int(line.split()[1]) / 1024

    probs = torch.softmax(torch.randn(10_000, 10, 100), dim=2)  # 40 MB of float32
    path = artifacts.save_cache(tmp_path / "bcp.safetensors", probs, {"n_views": 10})
    del probs
    before = anon_mb()
    mapped, _ = artifacts.load_cache(path, {}, floats_per_check=1 << 16)  # checked in 0.5 MB blocks, so the
    rows = mapped[torch.arange(0, 10_000, 7), 3]  # allocator keeps no large freed block (a whole read: 40 MB)
    assert anon_mb() - before < 10
    assert torch.allclose(rows.double().sum(1), torch.ones(len(rows), dtype=torch.float64), atol=1e-5)
    assert mapped.shape == (10_000, 10, 100) and mapped.dtype == torch.float32


def test_equal_payloads_give_byte_equal_checkpoints(tmp_path):
    payload = {"format": artifacts.TEACHER_FORMAT, "version": artifacts.VERSION, "w": torch.arange(4.0)}
    a = artifacts.save_checkpoint(tmp_path / "a" / "teacher.pt", payload)
    b = artifacts.save_checkpoint(tmp_path / "b" / "teacher.pt", payload)
    assert artifacts.sha256_file(a) == artifacts.sha256_file(b)
