"""How many intra-op threads torch runs: the CPUs this process may use, shared among this machine's torchrun
processes and the loader workers that decode images beside them, unless the user chose.

torch's default is the cores of the affinity mask (SLURM, taskset), but a cgroup's CPU quota (containers,
Kubernetes) may allow fewer, and torchrun processes and decoding workers share them; threads that outnumber the
CPUs free to them wait for each other at every operation (bench/threads.py: 5-76x slower on 2 cores).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from bcpkd_cli.console import line

CGROUP = Path("/sys/fs/cgroup")  # where the cgroup file systems are mounted
MEMBERSHIP = Path("/proc/self/cgroup")  # this process's cgroup per controller
_SAID: set[str] = set()  # the lines said in this process


@dataclass(frozen=True)
class Cpus:
    """The CPUs this process may run on (its affinity mask) and its cgroup's CPU quota in CPUs (None: none)."""

    affinity: int
    quota: float | None

    @property
    def usable(self) -> int:
        """The smaller of the two, in whole CPUs (at least 1)."""
        return self.affinity if self.quota is None else max(1, min(self.affinity, math.floor(self.quota)))

    def __str__(self) -> str:
        quota = "no cgroup quota" if self.quota is None else f"cgroup quota {self.quota:g}"
        return f"{self.usable} CPU{'s' if self.usable > 1 else ''} allowed: affinity {self.affinity}, {quota}"


def _folders(cgroup: Path, controller: str, membership: Path) -> list[Path]:
    """The folders of this process's cgroup for `controller` ("" for v2) and of its ancestors, the mount's root
    last (a container sees its own cgroup at the root, a host process in a slice below it)."""
    own = ""
    if membership.is_file():
        for entry in membership.read_text().splitlines():
            _, controllers, path = entry.split(":", 2)
            if controller in controllers.split(","):
                own = path.strip("/")
    parts = own.split("/") if own else []
    return [cgroup.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _quota(cgroup: Path, membership: Path) -> float | None:
    """The cgroup's CPU quota in CPUs, the smallest along its ancestry: cgroup v2 cpu.max ("quota period" or
    "max period"), cgroup v1 cpu.cfs_quota_us / cpu.cfs_period_us (-1: none). None: no quota."""
    found = []
    for folder in _folders(cgroup, "", membership):
        if (folder / "cpu.max").is_file():
            quota, period = (folder / "cpu.max").read_text().split()[:2]
            if quota != "max":
                found.append(int(quota) / int(period))
    for mount in (cgroup / "cpu", cgroup / "cpu,cpuacct"):
        for folder in _folders(mount, "cpu", membership):
            quota_file, period_file = folder / "cpu.cfs_quota_us", folder / "cpu.cfs_period_us"
            if quota_file.is_file() and period_file.is_file():
                quota, period = int(quota_file.read_text()), int(period_file.read_text())
                if quota > 0 and period > 0:
                    found.append(quota / period)
    return min(found) if found else None


def cpu_limits(cgroup: Path = CGROUP, membership: Path = MEMBERSHIP) -> Cpus:
    """This process's affinity mask and cgroup quota (machines without affinity masks: all cores)."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return Cpus(affinity, _quota(cgroup, membership))


def usable_cpus(cgroup: Path = CGROUP, membership: Path = MEMBERSHIP) -> int:
    """The CPUs this process may use: the smaller of its affinity mask and its cgroup quota."""
    return cpu_limits(cgroup, membership).usable


_RUN_WORKERS = 1  # the parallel student processes of `bcpkd run` (experiment.workers) that this process is one of


def share_with_run_workers(workers: int) -> None:
    """In a `bcpkd run` student worker: this process is one of `workers` sharing the machine's CPUs."""
    global _RUN_WORKERS
    _RUN_WORKERS = max(1, workers)


def local_processes() -> int:
    """The processes sharing this machine's CPUs: those torchrun started (1 without torchrun), times the parallel
    student workers of `bcpkd run`."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) * _RUN_WORKERS


def choose_threads(cpus: int, processes: int = 1, loader_workers: int = 0) -> int:
    """Each process's share of the CPUs, less the loader workers it runs beside (one CPU each), at least 1."""
    return max(1, cpus // max(1, processes) - loader_workers)


def apply_threads(setting: int = 0, loader_workers: int = 0, cgroup: Path = CGROUP,
                  membership: Path = MEMBERSHIP) -> tuple[int, str]:
    """Set torch's intra-op threads for a stage and say why on stderr (once per process; rank 0 under
    torchrun). `setting` (the recipe's `threads`) wins; OMP_NUM_THREADS in the environment is left as set;
    otherwise `choose_threads` from `loader_workers` (the workers decoding images while the network computes).
    Returns (threads, why)."""
    cpus, processes = cpu_limits(cgroup, membership), local_processes()
    omp = os.environ.get("OMP_NUM_THREADS", "")
    if setting > 0:
        threads, why = setting, f"threads={setting} in the recipe; {cpus}"
    elif omp:
        threads = torch.get_num_threads()
        why = f"OMP_NUM_THREADS={omp} in the environment, left as set; {cpus}"
        if processes > 1:
            why += "; torchrun sets OMP_NUM_THREADS=1 for several processes, --set threads=N overrides it"
    else:
        threads = choose_threads(cpus.usable, processes, loader_workers)
        many, each = ("es", " each") if processes > 1 else ("", "")
        workers = f" with {loader_workers} loader worker{'s' * (loader_workers > 1)}{each}" if loader_workers else ""
        why = f"{cpus}; {processes} process{many} on this machine{workers}; OMP_NUM_THREADS unset"
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    said = f"threads: {threads} intra-op ({why})"
    if said not in _SAID and os.environ.get("RANK", "0") == "0":
        _SAID.add(said)
        line(said)
    return threads, why
