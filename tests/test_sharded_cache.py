"""Caches built in shards (one block of rows per torchrun process) and a manifest that lists them: the blocks
are the one-process cache's rows bit for bit, and the manifest loads as that cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bcpkd_cli import artifacts
from bcpkd_cli.calibration import build_cache_probs, ensure_cache
from bcpkd_cli.config import CalibrateConfig, build_recipe
from bcpkd_cli.data import load_dataset
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.shards import ShardedRows, shard_name, shard_rows
from bcpkd_cli.targets import TableTargets
from bcpkd_cli.teachers import load_teacher
from bcpkd_cli.topk import TopKProbs
from cli_helpers import here, torchrun

pytestmark = pytest.mark.usefixtures("single_thread")

# 601 examples: the cache is built in batches of 100, so two processes take rows 0..300 and 300..601
SMALL = ["--set", "data.n_train=601", "--set", "data.n_heldout=100", "--set", "data.n_test=100",
         "--set", "teacher.hidden=[16]", "--set", "teacher.epochs=1", "--set", "distill.hidden=[8]",
         "--set", "distill.epochs=1", "--set", "distill.batch_size=150", "--set", "calibrate.batch_size=100",
         "--device", "cpu"]
FORMS = {"dense": {}, "top-k": {"top_k": 2}, "draws": {"draws": 3}}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> tuple[Path, Path]:
    """(work folder, an MC-dropout teacher.pt: its draws are seeded by the example ids)."""
    work = tmp_path_factory.mktemp("sharded")
    return work, work / here("train-teacher", "--bayes", "mc-dropout", "--out", "t", *SMALL, cwd=work).strip()


@pytest.fixture(scope="module")
def built(teacher):
    """(teacher, data) loaded as calibrate loads them."""
    payload = artifacts.load_checkpoint(teacher[1], artifacts.TEACHER_FORMAT)
    return load_teacher(payload, torch.device("cpu")), load_dataset(build_recipe(payload["config"], "test").data)


def whole(probs) -> tuple[torch.Tensor, ...]:
    """A cache's stored tensors, read whole."""
    return (probs.values[:], probs.ids[:]) if isinstance(probs, TopKProbs) else (probs[:],)


def test_shard_rows_are_contiguous_blocks_of_whole_batches():
    for n, batch, size in ((601, 100, 2), (601, 100, 3), (601, 100, 8), (10, 4, 2), (5, 8, 3)):
        blocks = [shard_rows(n, batch, rank, size) for rank in range(size)]
        assert blocks[0][0] == 0 and blocks[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
        assert all(start % batch == 0 for start, stop in blocks if stop > start)
    assert [shard_rows(601, 100, r, 2) for r in range(2)] == [(0, 300), (300, 601)]
    assert [shard_rows(5, 8, r, 3) for r in range(3)] == [(0, 0), (0, 0), (0, 5)]  # fewer batches than processes


@pytest.mark.parametrize("form", FORMS)
def test_blocks_of_rows_concatenate_to_the_whole_cache(built, form):
    teacher, data = built
    cfg = CalibrateConfig(batch_size=100, **FORMS[form])
    full = whole(build_cache_probs(teacher, data, 2.0, cfg))
    blocks = [whole(build_cache_probs(teacher, data, 2.0, cfg, shard_rows(601, 100, r, 3))) for r in range(3)]
    for k, tensor in enumerate(full):
        assert torch.equal(torch.cat([block[k] for block in blocks]), tensor)


def write_both(folder: Path, probs, meta: dict) -> tuple[Path, Path]:
    """The cache as one file and as a manifest of two shards (written as two processes write them)."""
    one = artifacts.save_cache(folder / "one" / "bcp.safetensors", probs, meta)
    manifest = folder / "two" / "bcp.safetensors"
    shards = []
    for rank in range(2):
        start, stop = shard_rows(len(probs), 100, rank, 2)
        part = TopKProbs(probs.values[start:stop], probs.ids[start:stop], probs.n_classes) \
            if isinstance(probs, TopKProbs) else probs[start:stop]
        shards.append(artifacts.save_cache_shard(manifest.parent / shard_name(manifest, rank, 2), part,
                                                 (start, stop), manifest))
    return one, artifacts.save_cache_manifest(manifest, shards, meta)


@pytest.fixture(params=list(FORMS))
def caches(request, built, tmp_path):
    teacher, data = built
    cfg = CalibrateConfig(batch_size=100, **FORMS[request.param])
    meta = {"teacher_sha256": "ab" * 32, "n_examples": 601, "n_classes": data.n_classes, **FORMS[request.param]}
    return write_both(tmp_path, build_cache_probs(teacher, data, 1.0, cfg), meta)


def test_a_manifest_of_shards_loads_as_the_one_file_cache(caches):
    one, two = caches
    a, meta_a = artifacts.load_cache(one, {})
    b, meta_b = artifacts.load_cache(two, {})
    assert [shard["rows"] for shard in meta_b.pop("shards")] == [[0, 300], [300, 601]]
    assert meta_b == meta_a
    assert b.shape == a.shape and len(b) == len(a) and b.ndim == a.ndim
    for x, y in zip(whole(a), whole(b)):
        assert torch.equal(x, y)
    rows, slots = torch.tensor([599, 0, 300, 299, 450]), torch.zeros(5, dtype=torch.long)
    assert torch.equal(b[rows, slots], a[rows, slots]) and torch.equal(b[:, 0], a[:, 0])
    assert all(torch.equal(x, y) for x, y in zip(whole(b[rows]), whole(a[rows])))
    table_a, table_b = TableTargets(a, draw="one"), TableTargets(b, draw="one")  # as distill reads the cache
    assert torch.equal(table_b.batch(rows, slots, 1, None, None, {}), table_a.batch(rows, slots, 1, None, None, {}))
    assert torch.equal(table_b.view_zero(None, None), table_a.view_zero(None, None))
    few_a, few_b = (table.subset(rows).batch(torch.tensor([1, 4]), slots[:2], 0, None, None, {})
                    for table in (table_a, table_b))
    assert torch.equal(few_b, few_a)


def test_sharded_rows_index_as_the_whole_tensor():
    whole_tensor = torch.arange(7 * 3 * 2.0).reshape(7, 3, 2)
    rows = ShardedRows([whole_tensor[:2], whole_tensor[2:3], whole_tensor[3:]])
    for index in (4, -1, slice(1, 6, 2), (slice(None), 1), (torch.tensor([6, 0, 2]), torch.tensor([2, 0, 1])),
                  (torch.tensor([[1], [5]]), torch.tensor([0, 2])), torch.tensor([], dtype=torch.long),
                  (torch.tensor(3), 1, 0)):
        assert torch.equal(rows[index], whole_tensor[index]), index
    assert rows.shape == whole_tensor.shape and torch.equal(rows.to("cpu"), whole_tensor)
    with pytest.raises(IndexError):
        rows[torch.tensor([7])]


def test_a_manifest_made_for_another_teacher_is_refused_as_a_one_file_cache(caches):
    one, two = caches
    messages = []
    for path in (one, two):
        for check in (artifacts.check_cache_metadata, artifacts.load_cache):
            with pytest.raises(BcpkdError) as info:
                check(path, {"teacher_sha256": "cd" * 32})
            messages.append(str(info.value).replace(str(path), "CACHE"))
    assert len(set(messages)) == 1 and "teacher_sha256" in messages[0] and "bcpkd calibrate" in messages[0]


def test_a_missing_or_changed_shard_is_named(caches):
    _, two = caches
    second = two.parent / shard_name(two, 1, 2)
    data = bytearray(second.read_bytes())
    data[-1] ^= 1  # one bit of the last row: same size, another SHA-256
    second.write_bytes(bytes(data))
    artifacts.check_cache_metadata(two, {})  # reads no rows
    with pytest.raises(BcpkdError, match="another size or SHA-256") as info:
        artifacts.load_cache(two, {})
    assert str(second) in str(info.value) and "--force" in str(info.value)
    second.unlink()
    for check in (artifacts.check_cache_metadata, artifacts.load_cache):
        with pytest.raises(BcpkdError, match="is missing") as info:
            check(two, {})
        assert str(second) in str(info.value) and "bcpkd calibrate --teacher TEACHER.pt --force" in str(info.value)
    with pytest.raises(BcpkdError, match="one shard of a BCP cache") as info:
        artifacts.load_cache(two.parent / shard_name(two, 0, 2), {})
    assert str(info.value).endswith(str(two))


def test_two_processes_build_the_one_process_cache(teacher):
    """calibrate under torchrun: two shards and a manifest, equal to one process's cache; distill reads it."""
    work, teacher_path = teacher
    one = Path(here("calibrate", "--teacher", str(teacher_path), "--out", "one", *SMALL, cwd=work).strip())
    result = torchrun("calibrate", "--teacher", str(teacher_path), "--out", "two", *SMALL, cwd=work)
    two = Path(result.stdout.strip())  # one line, printed by rank 0 only
    assert two == (work / "two" / "bcp.safetensors").resolve()
    assert {p.name for p in two.parent.iterdir()} == {
        "bcp.safetensors", "bcp.shard-00000-of-00002.safetensors", "bcp.shard-00001-of-00002.safetensors",
        "teacher.pt", "report.json", ".lock"}
    a, meta_a = artifacts.load_cache(one, {})
    b, meta_b = artifacts.load_cache(two, {})
    assert isinstance(b, ShardedRows) and torch.equal(b[:], a)
    assert [shard["rows"] for shard in meta_b.pop("shards")] == [[0, 300], [300, 601]]
    assert set(artifacts.differing_keys(meta_a, meta_b)) <= {"created"}  # the calibrated teacher.pt too
    assert (two.parent / "report.json").read_text() == (one.parent / "report.json").read_text()
    students = [here("distill", "--teacher", str(teacher_path), "--cache", str(cache), "--out", f"s-{name}", *SMALL,
                     cwd=work).strip() for name, cache in (("one", one), ("two", two))]
    weights = [torch.load(work / student, weights_only=True)["state_dict"] for student in students]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    here("calibrate", "--teacher", str(teacher_path), "--out", "two", "--force", *SMALL, cwd=work)  # one process
    assert not list(two.parent.glob("*shard*")) and torch.equal(artifacts.load_cache(two, {})[0], a)


def test_distill_under_torchrun_builds_a_missing_cache_in_shards(teacher):
    work, teacher_path = teacher
    torchrun("distill", "--teacher", str(teacher_path), "--out", "s-many", *SMALL, cwd=work)
    cache = Path(torch.load(work / "s-many" / "student.pt", weights_only=True)["targets"]["cache"])
    assert cache.parent.parent == teacher_path.parent / "bcp"
    probs, meta = artifacts.load_cache(cache, {})
    assert len(meta["shards"]) == 2
    one = Path(here("calibrate", "--teacher", str(teacher_path), "--out", "one-again", *SMALL, cwd=work).strip())
    assert torch.equal(probs[:], artifacts.load_cache(one, {})[0])


def test_the_automatic_batch_is_recorded_and_builds_the_explicit_batchs_cache(teacher):
    """calibrate.batch_size=0 builds in batches of 128 on the CPU and says so in the cache's metadata. Its rows are
    those of any batch that is a multiple of 32 (1024, the former default) bit for bit; other batches (100) may
    round a row's last bit differently (the float32 matrix products treat an incomplete block of 32 rows apart)."""
    work, teacher_path = teacher
    payload = artifacts.load_checkpoint(teacher_path, artifacts.TEACHER_FORMAT)
    data = load_dataset(build_recipe(payload["config"], "test").data)
    built = {}
    for batch in (0, 1024, 100):
        path, _ = ensure_cache(teacher_path, payload, data, CalibrateConfig(batch_size=batch), 1.0,
                               torch.device("cpu"), out=str(work / f"batch-{batch}"))
        built[batch] = artifacts.load_cache(path, {})
    automatic, meta = built[0]
    assert meta["inference_batch_size"] == 128 and meta["calibrate"]["batch_size"] == 0
    assert meta["threads"] == torch.get_num_threads()  # each building process's intra-op threads
    assert [built[batch][1]["inference_batch_size"] for batch in (1024, 100)] == [1024, 100]
    assert torch.equal(built[1024][0][:], automatic[:])
    torch.testing.assert_close(built[100][0][:], automatic[:], rtol=0, atol=1e-6)
