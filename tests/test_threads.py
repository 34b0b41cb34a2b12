"""Intra-op threads: chosen from the CPUs a process may use (affinity mask, cgroup quota), shared among
torchrun processes and the loader workers beside them, unless the user chose; said once on stderr."""

from __future__ import annotations

import os

import pytest
import torch

from bcpkd_cli import threads
from bcpkd_cli.config import DataConfig, build_recipe
from bcpkd_cli.data import decoding_workers
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.threads import apply_threads, choose_threads, cpu_limits, usable_cpus


@pytest.fixture(autouse=True)
def machine(monkeypatch):
    """Four CPUs in the affinity mask, no torchrun, no OMP_NUM_THREADS, nothing said yet; torch's thread count
    restored afterwards."""
    before = torch.get_num_threads()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    for name in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "_SAID", set())
    yield
    torch.set_num_threads(before)


def cgroup(tmp_path, files: dict[str, str], own: str = "/"):
    """A fake /sys/fs/cgroup holding `files` and a /proc/self/cgroup placing this process at `own`."""
    root = tmp_path / "cgroup"
    root.mkdir(parents=True)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text + "\n")
    membership = tmp_path / "cgroup-membership"
    membership.write_text(f"4:memory:{own}\n1:cpu:{own}\n0::{own}\n")
    return root, membership


def test_a_quota_of_one_and_a_half_cpus_gives_one_thread(tmp_path, capsys):
    root, membership = cgroup(tmp_path, {"cpu.max": "150000 100000"})
    assert usable_cpus(root, membership) == 1
    assert apply_threads(cgroup=root, membership=membership)[0] == 1 and torch.get_num_threads() == 1
    assert capsys.readouterr().err == ("threads: 1 intra-op (1 CPU allowed: affinity 4, cgroup quota 1.5; 1 process "
                                       "on this machine; OMP_NUM_THREADS unset)\n")


def test_the_affinity_mask_counts_when_the_quota_is_max(tmp_path, capsys):
    root, membership = cgroup(tmp_path, {"cpu.max": "max 100000"})
    assert cpu_limits(root, membership) == threads.Cpus(4, None)
    assert apply_threads(cgroup=root, membership=membership)[0] == 4 and torch.get_num_threads() == 4
    assert "(4 CPUs allowed: affinity 4, no cgroup quota; 1 process on this machine" in capsys.readouterr().err


def test_cgroup_v1_quotas_and_the_quota_of_a_parent_cgroup(tmp_path):
    root, membership = cgroup(tmp_path, {"cpu/cpu.cfs_quota_us": "200000", "cpu/cpu.cfs_period_us": "100000"})
    assert cpu_limits(root, membership) == threads.Cpus(4, 2.0)
    root, membership = cgroup(tmp_path / "none", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"})
    assert cpu_limits(root, membership).quota is None
    # a host process in a slice: its own cgroup has no limit, its parent's does
    root, membership = cgroup(tmp_path / "slice", {"job.slice/cpu.max": "300000 100000",
                                                   "job.slice/step.scope/cpu.max": "max 100000"},
                              own="/job.slice/step.scope")
    assert usable_cpus(root, membership) == 3


def test_torchrun_processes_share_the_cpus(tmp_path, monkeypatch, capsys):
    root, membership = cgroup(tmp_path, {})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert apply_threads(cgroup=root, membership=membership)[0] == 2
    assert "; 2 processes on this machine;" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(threads, "_SAID", set())
    apply_threads(cgroup=root, membership=membership)
    assert capsys.readouterr().err == ""  # rank 0 speaks for the job


def test_loader_workers_that_decode_beside_the_network_take_cpus(tmp_path, monkeypatch, capsys):
    assert [choose_threads(4, 1, workers) for workers in (0, 1, 3, 8)] == [4, 3, 1, 1]
    assert choose_threads(16, 2, 3) == 5 and choose_threads(1, 4) == 1
    root, membership = cgroup(tmp_path, {})
    assert apply_threads(0, 3, cgroup=root, membership=membership)[0] == 1
    assert "1 process on this machine with 3 loader workers;" in capsys.readouterr().err
    streamed = DataConfig(name="imagefolder", root="x", decode="stream", loader_workers=3)
    assert decoding_workers(streamed) == 3 and decoding_workers(DataConfig()) == 0
    assert decoding_workers(DataConfig(name="imagefolder", root="x", loader_workers=3)) == 0  # decoded once, up front


def test_omp_num_threads_is_left_alone_and_said(tmp_path, monkeypatch, capsys):
    root, membership = cgroup(tmp_path, {})
    torch.set_num_threads(3)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert apply_threads(cgroup=root, membership=membership) == (3, "OMP_NUM_THREADS=3 in the environment, left as "
                                                                     "set; 4 CPUs allowed: affinity 4, no cgroup quota")
    assert torch.get_num_threads() == 3
    assert capsys.readouterr().err.startswith("threads: 3 intra-op (OMP_NUM_THREADS=3 in the environment, left as set")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun's own OMP_NUM_THREADS=1: the way out is named
    assert "--set threads=N overrides it" in apply_threads(cgroup=root, membership=membership)[1]


def test_the_recipes_threads_win_and_the_line_is_said_once(tmp_path, monkeypatch, capsys):
    root, membership = cgroup(tmp_path, {"cpu.max": "150000 100000"})
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert apply_threads(2, cgroup=root, membership=membership)[0] == 2 and torch.get_num_threads() == 2
    apply_threads(2, cgroup=root, membership=membership)  # the next stage of the same process
    assert capsys.readouterr().err == ("threads: 2 intra-op (threads=2 in the recipe; 1 CPU allowed: affinity 4, "
                                       "cgroup quota 1.5)\n")


def test_the_threads_key():
    assert build_recipe({"threads": 3}).threads == 3 and build_recipe({}).threads == 0
    with pytest.raises(BcpkdError, match="threads: must be 0"):
        build_recipe({"threads": -1})


def test_the_workers_of_bcpkd_run_share_the_cpus(tmp_path, monkeypatch, capsys):
    """experiment.workers=2 on 4 CPUs: each student worker's automatic threads and loader workers are its half."""
    from bcpkd_cli.data.rows import default_workers

    root, membership = cgroup(tmp_path, {})
    monkeypatch.setattr(threads, "_RUN_WORKERS", 1)
    threads.share_with_run_workers(2)
    assert threads.local_processes() == 2 and default_workers() == 2
    assert apply_threads(cgroup=root, membership=membership)[0] == 2
    assert "; 2 processes on this machine;" in capsys.readouterr().err
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # and under torchrun, its processes too
    assert threads.local_processes() == 4
