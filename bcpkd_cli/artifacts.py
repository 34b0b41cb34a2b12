"""Checkpoints and the BCP cache: atomic save, safe load (`weights_only=True`), verification.

A checkpoint is a dict of tensors and plain Python values with `format` and `version` keys.
The BCP cache is a safetensors file: tensor `probs` [N, V, C] plus a string metadata header. A cache built
by several processes is a manifest at that path (the same header plus `shards`: file, rows [start, stop),
bytes and SHA-256 of each; no tensors) and shard files next to it holding those rows under the same names.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import save_file

from bcpkd_cli.diskspace import full_disk_failure
from bcpkd_cli.errors import BcpkdError
from bcpkd_cli.shards import ShardedRows
from bcpkd_cli.topk import TopKProbs

VERSION = 1
TEACHER_FORMAT = "bcpkd.teacher"
STUDENT_FORMAT = "bcpkd.student"
CACHE_FORMAT = "bcpkd.bcp-cache"
SHARD_FORMAT = "bcpkd.bcp-cache-shard"
TRAINING_FORMAT = "bcpkd.training-state"
TRAINING_STATE = "train-state.pt"  # a stage's resumable state (train-state-PHASE.pt for several phases)

_UMASK = os.umask(0)
os.umask(_UMASK)

FIX_HINT = {
    TEACHER_FORMAT: "make one with: bcpkd train-teacher --out DIR",
    STUDENT_FORMAT: "make one with: bcpkd distill --teacher TEACHER.pt --out DIR",
    CACHE_FORMAT: "make one with: bcpkd calibrate --teacher TEACHER.pt",
    TRAINING_FORMAT: "it is written at every epoch end of a run; start the run again without --resume",
}


def share_like_umask(folder: Path) -> None:
    """Give a folder written through a private staging folder (mkdtemp makes 0700) and everything in it the modes
    the umask gives new files and folders, so others on a shared disk read it as they read every artifact."""
    for path in [folder, *Path(folder).rglob("*")]:
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_UMASK)


def atomic_write(path: Path, write: Callable[[Path], None], size: int | None = None) -> Path:
    """Write through a temporary file in the same folder, then os.replace: never a half-written file. A full
    disk (or quota) is a BcpkdFailure naming `path` (and `size`, the bytes it needs, when known)."""
    path = Path(path)
    tmp = ""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; artifacts on shared disks follow the umask
        os.replace(tmp, path)
    except (OSError, SafetensorError, RuntimeError) as err:  # torch.save wraps the OSError in a RuntimeError
        failure = full_disk_failure(path, err, size)
        if failure is None:
            raise
        raise failure from None
    finally:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)
    return path


@contextlib.contextmanager
def exclusive_lock(path: Path, waiting_message: str):
    """Hold an exclusive lock on `path` (created if missing) for the block: concurrent jobs that would build
    the same artifact wait for the first one instead of building it again. Says so on stderr when it waits."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")
    except OSError as err:  # a full disk: the lock is the first file in a new cache's folder
        failure = full_disk_failure(path, err)
        if failure is None:
            raise
        raise failure from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(waiting_message, file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text), len(text.encode()))


def write_json(path: Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(path: Path, payload: dict) -> Path:
    """torch.save through a file object: the archive's inner folder is then always "archive", not the
    temporary file's name, so equal payloads give byte-equal files (and equal SHA-256)."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)

    return atomic_write(path, write, _tensor_bytes(payload))


def _tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in a nested payload (about a checkpoint's size)."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    return 0


ARTIFACT_NAMES = {TEACHER_FORMAT: "teacher.pt", STUDENT_FORMAT: "student.pt"}


def resolve_checkpoint(path: str | Path, expected_format: str | tuple[str, ...], option: str) -> Path:
    """The checkpoint a user means by `path`: a run folder stands for the teacher.pt or student.pt in it;
    a BCP cache or a folder without one is refused with what to pass instead."""
    path = Path(path)
    formats = (expected_format,) if isinstance(expected_format, str) else expected_format
    names = [ARTIFACT_NAMES[f] for f in formats if f in ARTIFACT_NAMES]
    if path.is_dir():
        found = [path / name for name in names if (path / name).is_file()]
        if len(found) == 1:
            return found[0]
        inside = sorted(str(p) for name in names for p in path.glob(f"*/{name}"))[:3]
        hint = f"; did you mean {' or '.join(inside)}?" if inside else \
            " (it holds an evaluate report.json)" if (path / "report.json").is_file() else f"; {FIX_HINT[formats[0]]}"
        raise BcpkdError(f"{option} {path}: is a folder without {' or '.join(names)}{hint}")
    if path.is_file() and _is_cache(path):
        raise BcpkdError(f"{option} {path}: is a BCP cache, not a checkpoint; pass it with --cache {path} (and its "
                         f"teacher with --teacher TEACHER.pt)")
    return path


def _is_cache(path: Path) -> bool:
    """A safetensors file (an 8-byte header length, then a JSON header)."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000


def load_checkpoint(path: str | Path, expected_format: str | tuple[str, ...], mmap: bool = False) -> dict:
    """Load a checkpoint without executing code; refuse a wrong format or version. `mmap`: its tensors are
    memory-mapped, read only where used (to look at its plain entries)."""
    path = Path(path)
    formats = (expected_format,) if isinstance(expected_format, str) else expected_format
    hint = FIX_HINT[formats[0]]
    if not path.is_file():
        raise BcpkdError(f"{path}: no such checkpoint; {hint}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # torch raises many types for a corrupt or foreign file
        reason = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        raise BcpkdError(f"{path}: not a readable bcpkd checkpoint ({reason}); {hint}") from None
    if not isinstance(payload, dict) or payload.get("format") not in formats:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise BcpkdError(f"{path}: expected a {' or '.join(formats)} checkpoint, found {found!r}; {hint}")
    if payload.get("version") != VERSION:
        raise BcpkdError(f"{path}: {payload['format']} version {payload.get('version')} is not {VERSION}; "
                         f"rebuild it with this bcpkd ({hint})")
    return payload


def read_weights(path: str | Path, option: str) -> tuple[str, dict, dict | None]:
    """A trained network's state dict from `.safetensors` or a `.pt`/`.pth` file read with weights_only=True: a
    nested `state_dict` or `model` entry is unwrapped and DDP's `module.` prefix removed. (name, state dict, and
    for a bcpkd student.pt or single-network teacher.pt its model spec: its keys are bcpkd's)."""
    path = Path(path)
    if not path.is_file():
        raise BcpkdError(f"{option} {path}: no such file; give a state dict saved with torch.save(model.state_dict(), "
                         f"PATH) or safetensors")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch and safetensors raise many types for foreign files
        raise BcpkdError(f"{option} {path}: not a readable state dict ({str(err).strip()[:100]}); save one with "
                         f"torch.save(model.state_dict(), PATH)") from None
    if isinstance(state, dict) and state.get("format") in (STUDENT_FORMAT, TEACHER_FORMAT):
        if state.get("bayes") in ("ensemble", "vi"):
            raise BcpkdError(f"{option} {path}: a {state['bayes']} teacher is not one network's weights; give a "
                             f"student.pt, a single-network teacher.pt or a state dict")
        return str(path), state["state_dict"], state["model"]
    while isinstance(state, dict) and len(state) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        inner = state.get("state_dict", state.get("model"))
        if not isinstance(inner, dict):
            raise BcpkdError(f"{option} {path}: holds no tensors at the top level nor a 'state_dict' or 'model' "
                             f"entry; save model.state_dict()")
        state = inner
    if not isinstance(state, dict) or not state:
        raise BcpkdError(f"{option} {path}: is not a state dict; save model.state_dict()")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return str(path), state, None


def save_training_state(path: Path, state: dict, settings: dict) -> Path:
    """A training loop's state at an epoch end, with the settings a resumed run must repeat."""
    return save_checkpoint(path, {"format": TRAINING_FORMAT, "version": VERSION, "settings": settings,
                                  "state": state})


def load_training_state(path: Path, settings: dict, tolerate: tuple[str, ...] = ()) -> tuple[dict, list[str]]:
    """The state an interrupted run saved, and which of the `tolerate` keys differ; refuse one saved with
    other settings (naming them)."""
    payload = load_checkpoint(path, TRAINING_FORMAT)
    differ = differing_keys(payload["settings"], settings)
    tolerated = [key for key in differ if key.split(".")[0] in tolerate]
    differ = [key for key in differ if key not in tolerated]
    if differ:
        raise BcpkdError(f"--resume: {path} was saved by a run with other settings ({', '.join(differ[:6])}); "
                         f"resume with the options of the interrupted run, or start afresh in another --out")
    return payload["state"], tolerated


def differing_keys(saved: Any, given: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (sorted)."""
    if isinstance(saved, dict) and isinstance(given, dict):
        return sorted(key for k in saved.keys() | given.keys()
                      for key in differing_keys(saved.get(k), given.get(k), f"{prefix}{k}."))
    return [] if saved == given else [prefix.rstrip(".")]


def _cache_tensors(probs: torch.Tensor | TopKProbs) -> dict[str, torch.Tensor]:
    if isinstance(probs, TopKProbs):
        return {"top_probs": probs.values.contiguous(), "top_ids": probs.ids.contiguous()}
    return {"probs": probs.contiguous()}


def _save_safetensors(path: Path, tensors: dict[str, torch.Tensor], file_format: str, metadata: dict) -> Path:
    """Tensors with JSON-encoded metadata values (safetensors keeps str -> str), atomically."""
    header = {"format": file_format, "version": str(VERSION), **{k: json.dumps(v) for k, v in metadata.items()}}
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=header), _tensor_bytes(tensors))


def save_cache(path: Path, probs: torch.Tensor | TopKProbs, metadata: dict[str, Any]) -> Path:
    """probs [N, V, C] (or its top-k form: top_probs and top_ids [N, V, K]) with its metadata."""
    return _save_safetensors(path, _cache_tensors(probs), CACHE_FORMAT, metadata)


def save_cache_shard(path: Path, probs: torch.Tensor | TopKProbs, rows: tuple[int, int], cache: Path) -> dict:
    """Rows [start, stop) of the cache `cache` (probs [stop - start, V, C] or its top-k form) as shard file `path`;
    its entry in the manifest: file (in the cache's folder), rows, bytes and SHA-256."""
    _save_safetensors(path, _cache_tensors(probs), SHARD_FORMAT, {"rows": list(rows), "cache": cache.name})
    return {"file": path.name, "rows": list(rows), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def save_cache_manifest(path: Path, shards: list[dict], metadata: dict[str, Any]) -> Path:
    """A cache built in shards (`save_cache_shard` entries, in row order): its metadata and the shard list."""
    return _save_safetensors(path, {}, CACHE_FORMAT, {**metadata, "shards": shards})


def read_cache_metadata(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise BcpkdError(f"{path}: not a readable BCP cache ({str(err)[:100]}); {FIX_HINT[CACHE_FORMAT]}") from None
    if header.get("format") == SHARD_FORMAT:
        raise BcpkdError(f"{path}: is one shard of a BCP cache; pass the cache itself, "
                         f"{path.parent / json.loads(header['cache'])}")
    if header.get("format") != CACHE_FORMAT or header.get("version") != str(VERSION):
        raise BcpkdError(f"{path}: not a {CACHE_FORMAT} v{VERSION} file; {FIX_HINT[CACHE_FORMAT]}")
    return {k: json.loads(v) for k, v in header.items() if k not in ("format", "version")}


MAPPED_DTYPES = {"F32": np.float32, "F16": np.float16, "U8": np.uint8, "I64": np.int64, "I32": np.int32}


def map_tensor(path: Path, name: str) -> torch.Tensor:
    """Tensor `name` of a safetensors file as a copy-on-write memory map: nothing is read until a row is
    indexed, and rows read stay in the page cache, not in the process's own memory."""
    with open(path, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        entry = json.loads(f.read(header_size))[name]
    dtype = MAPPED_DTYPES.get(entry["dtype"])
    if dtype is None:
        raise BcpkdError(f"{path}: {name} has dtype {entry['dtype']}, not one of {', '.join(MAPPED_DTYPES)}")
    start = 8 + header_size + entry["data_offsets"][0]
    return torch.from_numpy(np.memmap(path, dtype=dtype, mode="c", offset=start, shape=tuple(entry["shape"])))


REBUILD_SHARDS = "rebuild it with: bcpkd calibrate --teacher TEACHER.pt --force"


def _shard_files(path: Path, meta: dict[str, Any], contents: bool) -> list[Path]:
    """The shard files that the manifest `path` lists, each present with its recorded size (and, with `contents`,
    SHA-256), their rows covering [0, n_examples) in order; [] for a one-file cache."""
    shards = meta.get("shards")
    if shards is None:
        return []
    stops = [shard["rows"][1] for shard in shards]
    if [shard["rows"][0] for shard in shards] != [0, *stops[:-1]] or stops[-1:] != [meta.get("n_examples")]:
        raise BcpkdError(f"{path}: its shards do not hold rows 0..{meta.get('n_examples')} in order; {REBUILD_SHARDS}")
    files = [path.parent / shard["file"] for shard in shards]
    for file, shard in zip(files, shards):
        if not file.is_file():
            raise BcpkdError(f"{file}: shard of the BCP cache {path} is missing; {REBUILD_SHARDS}")
        if file.stat().st_size != shard["bytes"] or (contents and sha256_file(file) != shard["sha256"]):
            raise BcpkdError(f"{file}: is not the shard that the BCP cache {path} lists (another size or SHA-256); "
                             f"{REBUILD_SHARDS}")
    return files


def _map_shard(file: Path, name: str, rows: list[int]) -> torch.Tensor:
    """Tensor `name` of a shard, memory-mapped: [stop - start, ...]."""
    part = map_tensor(file, name)
    if len(part) != rows[1] - rows[0]:
        raise BcpkdError(f"{file}: holds {len(part)} rows of {name}, not rows {rows[0]}..{rows[1]}; {REBUILD_SHARDS}")
    return part


def map_cache_tensors(path: Path, meta: dict[str, Any], names: list[str]) -> list[torch.Tensor | ShardedRows]:
    """Tensors `names` of a cache, memory-mapped (`map_tensor`): of its one file, or of the shards that its
    manifest lists (each checked to be present, with its recorded size, SHA-256 and rows) as one ShardedRows."""
    files = _shard_files(path, meta, contents=True)
    if not files:
        return [map_tensor(path, name) for name in names]
    return [ShardedRows([_map_shard(file, name, shard["rows"]) for file, shard in zip(files, meta["shards"])])
            for name in names]


def check_cache_metadata(path: Path, expect: dict[str, Any]) -> dict[str, Any]:
    """The cache's metadata, every key of `expect` matching (dealbreakers); its rows are not read (the shards
    of a sharded cache must be there, with their recorded sizes)."""
    path = Path(path)
    if not path.is_file():
        raise BcpkdError(f"{path}: no such BCP cache; {FIX_HINT[CACHE_FORMAT]}")
    meta = read_cache_metadata(path)
    for key, want in expect.items():
        if meta.get(key) != want:
            raise BcpkdError(f"{path}: cache {key} is {meta.get(key)!r} but this run needs {want!r}; "
                             f"rebuild it with: bcpkd calibrate --teacher TEACHER.pt")
    _shard_files(path, meta, contents=False)
    return meta


def load_cache(path: Path, expect: dict[str, Any],
               floats_per_check: int = 1 << 20) -> tuple[torch.Tensor | ShardedRows | TopKProbs, dict[str, Any]]:
    """Memory-mapped probs [N, V, C] (or [N, V, K, C] with K draws) and metadata; every key of `expect` must
    match (dealbreakers). A sharded cache gives one ShardedRows over its shards.
    Rows are checked to sum to 1 in blocks of about `floats_per_check` numbers (8 MB as float64), so
    checking never holds more than a block in memory."""
    meta = check_cache_metadata(path, expect)
    if meta.get("top_k"):
        return _load_top_k(path, meta), meta
    (probs,) = map_cache_tensors(path, meta, ["probs"])
    if probs.dtype not in (torch.float32, torch.float16):
        raise BcpkdError(f"{path}: cache dtype {probs.dtype} is not float32 or float16; {FIX_HINT[CACHE_FORMAT]}")
    tolerance = 1e-2 if probs.dtype == torch.float16 else 1e-4
    corrupt = probs.ndim not in (3, 4)  # [N, V, C], or [N, V, K, C] with draws
    rows_per_check = max(1, floats_per_check // max(1, probs[0].numel())) if not corrupt else 1
    for start in range(0, 0 if corrupt else len(probs), rows_per_check):
        row_sums = probs[start:start + rows_per_check].double().sum(dim=-1)
        corrupt = corrupt or not torch.allclose(row_sums, torch.ones_like(row_sums), atol=tolerance)
    if corrupt:
        raise BcpkdError(f"{path}: cache rows do not sum to 1 (corrupt); delete it and rebuild with: "
                         f"bcpkd calibrate --teacher TEACHER.pt")
    return probs, meta


def _load_top_k(path: Path, meta: dict[str, Any], rows_per_check: int = 65_536) -> TopKProbs:
    """A top-k cache, memory-mapped; its kept probabilities must be non-negative, sum to at most 1 and name
    classes 0..C-1 (checked in blocks)."""
    values, ids = map_cache_tensors(path, meta, ["top_probs", "top_ids"])
    n_classes = meta["n_classes"]
    tolerance = 1e-2 if values.dtype == torch.float16 else 1e-4
    for start in range(0, len(values), rows_per_check):
        block, block_ids = values[start:start + rows_per_check].double(), ids[start:start + rows_per_check]
        if block.min() < 0 or block.sum(dim=-1).max() > 1 + tolerance or block_ids.min() < 0 or \
                block_ids.max() >= n_classes:
            raise BcpkdError(f"{path}: top-k cache rows are not parts of distributions over {n_classes} classes "
                             f"(corrupt); delete it and rebuild with: bcpkd calibrate --teacher TEACHER.pt")
    return TopKProbs(values, ids, n_classes)


def write_config(folder: Path, record: dict, chosen: dict | None = None, about: list[str] | None = None) -> Path:
    """An artifact's resolved config (`config.recipe_record`) next to it, as YAML that `--recipe` accepts. `chosen`
    ({dotted key: value}): what the run used for keys the record leaves unset (0, -1 or '': automatic), said beside
    each of them (`threads: 0  # automatic: 4 in this run`; the checkpoint keeps the values). `about`: comment
    lines first (what the artifact was made from)."""
    lines = yaml.safe_dump(record, sort_keys=False).split("\n")
    for dotted, value in (chosen or {}).items():
        *sections, key = dotted.split(".")
        path: list[str] = []  # the sections the line is in
        for i, text in enumerate(lines):
            name = text.lstrip(" ").split(":", 1)[0]
            del path[(len(text) - len(text.lstrip(" "))) // 2:]
            if path == sections and name == key and text.endswith((": 0", ": -1", ": ''")):  # the unset values
                lines[i] = f"{text}  # automatic: {value} in this run"
                break
            path.append(name)
    return write_text(Path(folder) / "config.yaml", "".join(f"# {text}\n" for text in about or []) + "\n".join(lines))


def new_run_dir(out: str, prefix: str) -> Path:
    """`out` when given, else a fresh runs/<prefix>-<YYYYmmdd-HHMMSS>[-N] folder."""
    if out:
        if Path(out).exists() and not Path(out).is_dir():
            raise BcpkdError(f"--out {out}: is a file; give a folder (the artifact's name is chosen inside it)")
        return Path(out)
    from datetime import datetime

    base = Path("runs") / f"{prefix}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path
