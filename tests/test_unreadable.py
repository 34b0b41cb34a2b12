"""Unreadable image files: all listed in one refusal, or left out with data.skip_unreadable (and recorded in the
data fingerprint); a file that goes bad while a streamed run trains ends it in one line, and --resume goes on."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from bcpkd_cli import artifacts
from bcpkd_cli.config import DataConfig, DatasetName
from bcpkd_cli.choices import Decode
from bcpkd_cli.data import images as image_data
from bcpkd_cli.data import load_dataset
from bcpkd_cli.errors import BcpkdError
from cli_helpers import failed_here, here, refused_here

pytestmark = pytest.mark.usefixtures("single_thread")  # small tensors: one thread, here and in the CLI


def _image(path, value: int, size: int = 8, kind: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value, 255 - value, (3 * value) % 256)).save(path, kind)


def _jpeg_bytes(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (value, value, 0)).save(buffer, "JPEG")
    return buffer.getvalue()


def _dirty_folder(root):
    """2 classes x 6 PNGs for training and 2 for testing, and three files no decoder reads in train/."""
    for c, name in enumerate(("ant", "bee")):
        for i in range(6):
            _image(root / "train" / name / f"{i}.png", 100 * c + 10 * i)
        for i in range(2):
            _image(root / "test" / name / f"{i}.png", 100 * c + 5 * i)
    (root / "train" / "ant" / "empty.jpg").write_bytes(b"")
    (root / "train" / "bee" / "cut.jpg").write_bytes(_jpeg_bytes(9)[:-60])
    (root / "train" / "bee" / "notes.png").write_text("this is not a picture")
    return root


def _cfg(root, **changes) -> DataConfig:
    return DataConfig(name=DatasetName.imagefolder, root=str(root), n_heldout=2, **changes)


def test_every_unreadable_file_is_listed_in_one_refusal_and_the_store_is_not_decoded_again(tmp_path, monkeypatch):
    root = _dirty_folder(tmp_path)
    with pytest.raises(BcpkdError) as first:
        load_dataset(_cfg(root))
    message = str(first.value)
    assert message.startswith(f"{root / 'train'}: 3 unreadable image files: ")
    for fragment in ("ant/empty.jpg (empty file)", "bee/cut.jpg (truncated)", "bee/notes.png (not an image)",
                     "--set data.skip_unreadable=true"):
        assert fragment in message
    monkeypatch.setattr(image_data, "write_store", lambda *a, **k: pytest.fail("decoded again"))
    with pytest.raises(BcpkdError, match="3 unreadable image files"):
        load_dataset(_cfg(root))  # the store of the readable files knows the others
    data = load_dataset(_cfg(root, skip_unreadable=True))
    assert len(data.train) + len(data.heldout) == 12 and data.train.inputs.shape[1:] == (3, 8, 8)
    assert data.notes[0] == "train 12 files (3 unreadable left out), test 4 files"


def test_files_left_out_change_the_fingerprint_and_stream_equals_store(tmp_path):
    root = _dirty_folder(tmp_path)
    stored = load_dataset(_cfg(root, skip_unreadable=True, image_size=8))
    streamed = load_dataset(_cfg(root, skip_unreadable=True, image_size=8, decode=Decode.stream, loader_workers=1))
    assert streamed.fingerprint == stored.fingerprint  # the same files left out, found by the header check
    assert torch.equal(streamed.train.inputs[0:len(streamed.train)], stored.train.inputs)
    for name in ("ant/empty.jpg", "bee/cut.jpg"):  # repaired: the same listing, other data
        (root / "train" / name).write_bytes(_jpeg_bytes(7))
    (root / "train" / "bee" / "notes.png").unlink()
    _image(root / "train" / "bee" / "notes.png", 77)
    repaired = load_dataset(_cfg(root, image_size=8))
    assert repaired.fingerprint != stored.fingerprint and len(repaired.train) + len(repaired.heldout) == 15


def test_more_than_twenty_are_counted(tmp_path):
    root = _dirty_folder(tmp_path)
    for i in range(25):
        (root / "train" / "ant" / f"blank{i:02d}.png").write_bytes(b"")
    with pytest.raises(BcpkdError, match=r": 28 unreadable image files: .* and 8 more; remove or replace them"):
        load_dataset(_cfg(root, decode=Decode.stream, image_size=8))


def test_the_cli_refuses_them_in_one_line_before_training(tmp_path):
    root = _dirty_folder(tmp_path / "data")
    message = refused_here("train-teacher", "--data", "imagefolder", "--data-root", str(root), "--arch", "resnet20",
                           "--out", "t", cwd=tmp_path)
    assert "3 unreadable image files" in message and not (tmp_path / "t" / "teacher.pt").exists()


@pytest.mark.parametrize("fix", ["restore", "skip"])
def test_a_file_cut_while_streaming_ends_the_run_in_one_line_and_resume_goes_on(single_thread, tmp_path, monkeypatch,
                                                                                 fix):
    root = tmp_path / "data"
    for c, name in enumerate(("ant", "bee")):
        for i in range(8):
            _image(root / "train" / name / f"{i}.jpg", 100 * c + 10 * i, size=16, kind="JPEG")
        _image(root / "test" / name / "0.jpg", 100 * c, size=16, kind="JPEG")
    victim = root / "train" / "bee" / "3.jpg"
    whole = victim.read_bytes()
    save = artifacts.save_training_state

    def save_then_cut(path, state, settings):  # the file goes bad after the first epoch's state is kept
        save(path, state, settings)
        victim.write_bytes(whole[:-80])

    args = ["train-teacher", "--data", "imagefolder", "--data-root", str(root), "--arch", "resnet20", "--epochs", "2",
            "--batch-size", "8", "--set", "data.decode=stream", "--set", "data.image_size=16", "--set",
            "data.loader_workers=1", "--set", "data.n_heldout=0", "--out", "t"]
    monkeypatch.setattr(artifacts, "save_training_state", save_then_cut)
    message = failed_here(*args, cwd=tmp_path)
    assert message.startswith(f"error: {victim}: not a readable image (truncated), found while streaming")
    assert list((tmp_path / "t").glob("train-state*.pt")) and not (tmp_path / "t" / "teacher.pt").exists()
    monkeypatch.setattr(artifacts, "save_training_state", save)
    if fix == "restore":
        victim.write_bytes(whole)
        resumed = args + ["--resume"]
    else:
        resumed = args + ["--resume", "--set", "data.skip_unreadable=true"]
    teacher = here(*resumed, cwd=tmp_path).strip()
    payload = torch.load(tmp_path / teacher, weights_only=True)
    assert payload["data"]["sizes"]["train"] == (16 if fix == "restore" else 15)
