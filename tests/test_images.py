"""Image loading on tiny fake files in the real on-disk formats (CIFAR python pickles, ImageFolder)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torchvision.io import write_png

from bcpkd_cli.data import images as image_data
from bcpkd_cli.data.decode import decode_images
from bcpkd_cli.errors import BcpkdError

pytestmark = pytest.mark.usefixtures("single_thread")  # small tensors: one thread, here and in the CLI


def write_cifar10(root, n_per_batch=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    expected = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n_per_batch).tolist()
        (folder / name).write_bytes(pickle.dumps({b"data": data, b"labels": labels, b"batch_label": b"x"}))
        expected.append((data, labels))
    return expected


def test_cifar10_python_batches(tmp_path):
    expected = write_cifar10(tmp_path)
    images, labels = image_data.read_cifar(tmp_path, "cifar10", "train")
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images[4].flatten(), torch.from_numpy(expected[1][0][0]))  # row-major R, G, B planes
    assert labels.tolist() == [y for _, ys in expected[:5] for y in ys]
    test_images, _ = image_data.read_cifar(tmp_path, "cifar10", "test")
    assert test_images.shape == (4, 3, 32, 32)


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = np.zeros((3, 3072), dtype=np.uint8)
    for name in ("train", "test"):
        (folder / name).write_bytes(pickle.dumps({b"data": data, b"fine_labels": [99, 5, 0], b"coarse_labels": [1] * 3}))
    assert image_data.read_cifar(tmp_path, "cifar100", "train")[1].tolist() == [99, 5, 0]


class _Evil:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_a_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps({b"data": _Evil(), b"labels": []}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BcpkdError, match="data_batch_3"):
        image_data.read_cifar(tmp_path, "cifar10", "train")
    assert not (tmp_path / "PWNED").exists()


def test_missing_cifar_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(BcpkdError, match="data.download=true"):
        image_data.read_cifar(tmp_path, "cifar10", "train")


def write_folder(root, per_class=3):
    pixels = {}
    for c, name in enumerate(["cat", "airplane"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = torch.randint(0, 256, (3, 8, 8), generator=torch.Generator().manual_seed(10 * c + i),
                                  dtype=torch.uint8)
            write_png(image, str(root / name / f"{i:04d}.png"))
            pixels[(name, i)] = image
    return pixels


def test_image_folder_is_decoded_exactly_and_labelled_by_sorted_class(tmp_path):
    pixels = write_folder(tmp_path)
    paths, labels, classes, _ = image_data.list_image_folder(tmp_path)
    assert classes == ["airplane", "cat"] and labels == [0, 0, 0, 1, 1, 1]
    decoded = decode_images(paths)
    assert decoded.shape == (6, 3, 8, 8)
    assert torch.equal(decoded[3], pixels[("cat", 0)])  # PNG is lossless


def test_store_decodes_once_and_again_when_files_change(tmp_path):
    write_folder(tmp_path)
    paths, labels, _, _ = image_data.list_image_folder(tmp_path)
    first = image_data.load_or_decode(tmp_path, "train", paths, labels)
    second = image_data.load_or_decode(tmp_path, "train", paths, labels)
    assert first[2] and not second[2]
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    # written block by block (blocks of 4 rows here), equal to decoding every file at once
    assert torch.equal(first[0], decode_images(paths)) and first[1].tolist() == labels
    image_data.write_store(tmp_path / "blocks.safetensors", paths, torch.tensor(labels), 0, rows_per_block=4)
    blocks = image_data.load_or_decode(tmp_path, "train", paths, labels, store=tmp_path / "unused")
    assert torch.equal(blocks[0], first[0]) and blocks[3] == first[3] == image_data.channel_stats(first[0])
    write_png(torch.zeros(3, 8, 8, dtype=torch.uint8), str(tmp_path / "cat" / "0009.png"))
    paths, labels, _, _ = image_data.list_image_folder(tmp_path)
    assert image_data.load_or_decode(tmp_path, "train", paths, labels)[2]


def test_read_only_data_folder_stores_in_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(image_data.os, "access", lambda path, mode: False)  # as for a read-only mount
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert image_data.store_folder(tmp_path / "data") == tmp_path / "cache" / "bcpkd" / "store"
    monkeypatch.setattr(image_data.os, "access", lambda path, mode: True)
    assert image_data.store_folder(tmp_path / "data") == tmp_path / "data" / ".bcpkd-store"


def test_hidden_folders_are_not_classes(tmp_path):
    write_folder(tmp_path)
    (tmp_path / ".bcpkd-store").mkdir()
    assert image_data.list_image_folder(tmp_path).classes == ["airplane", "cat"]
