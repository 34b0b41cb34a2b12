"""Images read per batch: decode=stream decodes the files of every batch in worker processes, a memory-mapped
store reads its rows; both read planned batches ahead and give exactly the store's pixels, so a teacher,
its cache and a student are the same whichever way the images arrive."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bcpkd_cli import artifacts
from bcpkd_cli.config import DataConfig
from bcpkd_cli.data import images as image_data
from bcpkd_cli.data import load_dataset
from bcpkd_cli.data import rows as rows_module
from bcpkd_cli.data.decode import decode_images
from bcpkd_cli.data.rows import MappedRows, PathTable, StreamedRows
from cli_helpers import here, here_run, refused_here

pytestmark = pytest.mark.usefixtures("single_thread")  # small tensors: one thread, here and in the CLI

RUN = ["--data", "imagefolder", "--device", "cpu", "--set", "data.n_heldout=15", "--set", "data.image_size=12",
       "--set", "data.crop=resized", "--set", "data.loader_workers=2"]


def test_streamed_rows_are_the_stores_rows_in_any_order_and_ahead_of_time(image_folder, monkeypatch):
    paths, labels, _, _ = image_data.list_image_folder(image_folder / "train")
    store = decode_images(paths, 12)  # [90, 3, 12, 12]
    streamed = StreamedRows(paths, (3, 12, 12), torch.arange(len(paths)), workers=2)
    assert streamed.shape == store.shape and len(streamed) == 90
    assert torch.equal(streamed[5], store[5]) and torch.equal(streamed[10:20], store[10:20])
    batches = [torch.randperm(90, generator=torch.Generator().manual_seed(e))[:32] for e in range(4)]
    streamed.plan(batches)
    for rows in batches:  # read ahead by the workers, handed out in order
        assert torch.equal(streamed[rows], store[rows])
    streamed.plan(batches)
    assert torch.equal(streamed[batches[0]], store[batches[0]])
    assert torch.equal(streamed[batches[2]], store[batches[2]])  # off plan: read at once, beside the plan
    assert torch.equal(streamed[0:40], store[0:40])  # a scan between planned batches (e.g. centroids)
    assert torch.equal(streamed[batches[1]], store[batches[1]]) and len(streamed._plan.batches) == 2  # still planned
    assert torch.equal(torch.cat([streamed[i:i + 16] for i in range(0, 90, 16)]), store)  # a scan, read ahead
    monkeypatch.setattr(rows_module, "SCAN_ROWS", 7)
    assert torch.equal(streamed[3:50], store[3:50]) and torch.equal(streamed[50:90], store[50:90])  # in parts of 7
    assert torch.equal(streamed[torch.tensor(4)], store[4:5])  # a 0-d index
    subset = streamed.subset(torch.tensor([3, 1, 4]))
    assert torch.equal(subset[torch.tensor([0, 2])], store[torch.tensor([3, 4])])
    mapped = MappedRows(store, torch.arange(90), workers=2)
    mapped.plan(batches)
    torch.manual_seed(5)
    assert all(torch.equal(mapped[rows], store[rows]) for rows in batches)
    after_reading = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after_reading, torch.rand(3))  # reading ahead drew no random numbers (dropout stays put)


def test_stream_and_store_load_the_same_dataset(image_folder):
    store = load_dataset(DataConfig(name="imagefolder", root=str(image_folder), n_heldout=15, image_size=12))
    stream = load_dataset(DataConfig(name="imagefolder", root=str(image_folder), n_heldout=15, image_size=12,
                                     decode="stream"))
    assert isinstance(stream.train.inputs, StreamedRows) and isinstance(store.train.inputs, torch.Tensor)
    assert stream.fingerprint == store.fingerprint and stream.stats == store.stats  # all 90 files sampled
    for name in ("train", "heldout", "test"):
        assert torch.equal(stream.split(name).inputs[0:len(stream.split(name))], store.split(name).inputs)


def test_teacher_cache_and_student_are_equal_through_stream_and_store(single_thread, image_folder, tmp_path):
    teachers = {}
    for decode in ("store", "stream"):
        run = [*RUN, "--data-root", str(image_folder), "--set", f"data.decode={decode}"]
        teacher = here("train-teacher", "--bayes", "laplace", "--arch", "resnet8x4", "--epochs", "1", *run,
                       "--set", "teacher.batch_size=32", "--set", "teacher.laplace.grid_size=3", "--out", f"t_{decode}",
                       cwd=tmp_path).strip()
        student = here("distill", "--teacher", teacher, "--arch", "wrn_16_1", "--epochs", "1", "--views", "3",
                       "--set", "calibrate.top_k=2", "--set", "distill.batch_size=32", *run, "--out", f"s_{decode}",
                       cwd=tmp_path).strip()
        teachers[decode] = [torch.load(tmp_path / p, weights_only=True) for p in (teacher, student)]
    for store, stream in zip(teachers["store"], teachers["stream"]):
        assert {**store["data"], "config": None} == {**stream["data"], "config": None}  # fingerprint, stats, sizes
        assert store["data"]["config"]["decode"] == "store" and stream["data"]["config"]["decode"] == "stream"
        assert all(torch.equal(store["state_dict"][k], stream["state_dict"][k]) for k in store["state_dict"])


def test_stream_needs_an_image_size(image_folder, tmp_path):
    message = refused_here("train-teacher", "--data", "imagefolder", "--data-root", str(image_folder),
                           "--set", "data.decode=stream", "--epochs", "0", cwd=tmp_path)
    assert "data.decode=stream" in message and "data.image_size" in message


@pytest.mark.slow
def test_the_imagenet_miniature_recipe_runs(tmp_path, no_figures):
    """recipes/imagenet-miniature.yaml on the generated 1,000-class folder (one JPEG per class and split), as a
    shell script runs it (the folder's script in its own process, `bcpkd run` in this one, which has its imports
    already: laplace alone takes 10 s of CPU to import): a Laplace resnet18 teacher, a top-5 cache of
    random-resized crops, streamed."""
    repo = Path(__file__).parents[1]
    subprocess.run([sys.executable, str(repo / "recipes" / "examples" / "make_imagenet_miniature.py"),
                    str(tmp_path / "mini"), "--per-class", "1", "--sides", "48", "160"],  # sizes still vary
                   check=True, capture_output=True)
    summary = here_run("run", str(repo / "recipes" / "imagenet-miniature.yaml"), "--set",
                       f"data.root={tmp_path / 'mini'}", "--set", "data.n_heldout=200",
                       "--set", "data.n_train=400",  # 400 of the other 800 train: every stage's time halves
                       "--set", "data.n_test=100",  # 100 of the 1,000 test JPEGs
                       "--set", "distill.grad_noise_examples=64",  # per-example gradients of mobilenet on 64, not 800
                       "--set", "teacher.log_every=7", "--set", "distill.log_every=7",  # held-out NLL at steps 0, 7
                       "--set", "teacher.laplace.grid_size=5",  # (not at each of the 7 steps); 5 prior grid points
                       "--out", "run", cwd=tmp_path).stdout.strip()
    report = json.loads(Path(tmp_path / summary).read_text())
    assert "view_padding" not in report["config"]["data"]  # resized crops do not pad
    assert report["config"]["data"]["n_test"] == 100
    assert report["config"]["data"]["decode"] == "stream" and [r["name"] for r in report["students"]] == ["from_laplace"]
    cache = next((tmp_path / "run" / "teachers").rglob("bcp.safetensors"))
    meta = artifacts.read_cache_metadata(cache)
    assert meta["top_k"] == 5 and meta["n_classes"] == 1000 and meta["crop"] == "resized" and meta["view_device"] == "cpu"
    assert meta["n_examples"] == 400 and meta["n_views"] == 4


def test_path_table_round_trips_paths():
    paths = [Path("train/n01/é_1.JPEG"), Path("/data/x/b.jpg"), Path("c d/e.png")]
    table = PathTable(paths)
    assert len(table) == 3 and [table[i] for i in range(3)] == paths and not table.all_jpeg
    assert PathTable(paths[:2]).all_jpeg
