"""Calibrate a teacher on held-out data and build (or find) its BCP cache for the training split.

Shared by the `calibrate` and `distill` stages. A cache lives in <teacher folder>/bcp/<key>/,
where key hashes everything that determines its rows: the teacher file's SHA-256, the data
fingerprint, the calibration settings and the teacher temperature T_t. The folder holds
    bcp.safetensors   probs [N, V, C] (V views per training example) + provenance header
    teacher.pt        the calibrated teacher (parent_sha256 = the original)
    report.json       held-out NLL / ECE / Brier before and after calibration
    .lock             held while the cache is built: concurrent jobs wait, then use it
Built by P processes (torchrun), bcp.safetensors is a manifest (the same header plus the shard list) of
bcp.shard-0000r-of-0000P.safetensors, each holding one process's block of rows (`shards`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from bcpkd_cli import artifacts, topk
from bcpkd_cli.choices import CacheDtype, PriorTuning, Temper, TemperatureFit, teacher_label
from bcpkd_cli.config import TEACHER_RECORD, CalibrateConfig, Recipe, build_recipe, recipe_record, to_plain
from bcpkd_cli.console import console
from bcpkd_cli.data import Dataset, require_classes, views
from bcpkd_cli.diskspace import require_space
from bcpkd_cli.engine import World, world
from bcpkd_cli.models import inference_batch_size
from bcpkd_cli.errors import BcpkdError, BcpkdFailure
from bcpkd_cli.shards import shard_files, shard_name, shard_rows
from bcpkd_cli.teachers import Teacher, load_teacher, teacher_payload
from bcpkd_cli.topk import TopKProbs
from bcpkd_cli.tuning import calibrate

CACHE_FILE = "bcp.safetensors"
# Bumped when a teacher kind's predictive changes for the same checkpoint, so caches of the old
# predictive are neither found nor accepted (2: MC-dropout masks drawn from per-(layer, draw) pools; 3: a prior
# grid search keeps the teacher's own prior precision where no grid point lowers held-out NLL).
PREDICTIVE_VERSION = 3


def refuse_calibrated(teacher_path: Path, payload: dict) -> None:
    """A calibrated teacher (the teacher.pt that calibrate writes next to a cache) where the original teacher is
    expected would be calibrated a second time: say so, and name the original."""
    if "calibration" not in payload.get("history", {}):
        return
    teacher_path = Path(teacher_path)
    original = teacher_path.resolve().parent.parent.parent / "teacher.pt"
    named = f" ({original})" if original.is_file() and artifacts.sha256_file(original) == payload["parent_sha256"] \
        else ""
    raise BcpkdError(f"--teacher {teacher_path}: is a teacher that calibrate already calibrated; pass the original "
                     f"teacher{named} with --teacher (its cache is found again), or the cache next to it with "
                     f"--cache {teacher_path.parent / CACHE_FILE}")


def temper(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(log p / T) = p^(1/T) renormalised: the distribution whose logits are log p, at temperature T."""
    if temperature == 1.0:
        return probs
    return torch.softmax(probs.clamp_min(1e-30).log() / temperature, dim=-1)


def at_temperature(predictive: Callable[[float], torch.Tensor], t_teacher: float, mode: Temper) -> torch.Tensor:
    """A teacher's targets at T_t: `logits` divides each logit draw (or the logit distribution) by T_t inside the
    predictive; `predictive` tempers the predictive at T = 1 (average, then temper). The same for the
    probabilities of each draw ([S, B, C], from Teacher.draws_at): each draw is tempered on its own."""
    return predictive(t_teacher) if mode == Temper.logits else temper(predictive(1.0), t_teacher)


def cache_key(teacher_sha256: str, data_fingerprint: str, cfg: CalibrateConfig, t_teacher: float,
              view_settings: dict | None = None) -> str:
    settings = {"teacher": teacher_sha256, "data": data_fingerprint, "t_teacher": t_teacher, "views": cfg.views,
                "prior": cfg.prior.value, "temperature": cfg.temperature.value, "dtype": cfg.cache_dtype.value,
                "predictive_version": PREDICTIVE_VERSION}
    if cfg.temper != Temper.logits:  # the defaults leave the keys of caches made before these settings unchanged
        settings["temper"] = cfg.temper.value
    if cfg.views > 1:  # the view space where it is not the first one (pad crops with zeros)
        settings.update(view_settings or {})
    if cfg.draws:
        settings["draws"] = cfg.draws
    if cfg.top_k:
        settings["top_k"] = cfg.top_k
    if cfg.prior_grid:
        settings["prior_grid"] = list(cfg.prior_grid)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def cache_path(teacher_path: Path, key: str, out: str = "") -> Path:
    return (Path(out) if out else Path(teacher_path).parent / "bcp" / key) / CACHE_FILE


def inference_batch(cfg: CalibrateConfig, device: torch.device | str) -> int:
    """The batch the cache is built in: calibrate.batch_size, or for 0 the one of this type of device
    (`inference_batch_size`). Every row is computed in a batch of exactly this size (`build_cache_probs` fills the last
    one up), so the rows do not depend on where the data ends or how it is sharded."""
    return cfg.batch_size or inference_batch_size(device)


def cache_view_ids(data: Dataset, cfg: CalibrateConfig) -> torch.Tensor:
    """The view ids of the cache's V slots (view 0, the image itself, first)."""
    return views.select_views(cfg.views, data.seed)


def build_cache_probs(teacher: Teacher, data: Dataset, t_teacher: float, cfg: CalibrateConfig,
                      rows: tuple[int, int] | None = None) -> torch.Tensor | TopKProbs:
    """The teacher's predictive at T_t on every view slot of every training example -> [N, V, C]; with
    calibrate.draws K, the first K Monte Carlo draws instead -> [N, V, K, C]; with calibrate.top_k K, the top-k
    form (compressed chunk by chunk, so the dense cache never exists whole). `rows` (start, stop): those
    training rows only -> [stop - start, ...], in batches from `start` (their example ids, which seed draws and
    views, stay the row numbers of the whole split). The batches hold `inference_batch` rows each, the last one
    filled up with copies of its last row (dropped after), so that no row is computed in a smaller batch, whose
    kernels may round differently."""
    start, stop = rows or (0, len(data.train))
    train = data.train
    view_ids = cache_view_ids(data, cfg)
    view_space = data.views
    batch = inference_batch(cfg, train.inputs.device)
    chunks = []  # per batch of rows: [B, V, C] (or [B, V, K, C]; top-k: values and ids [B, V, K])
    for i in range(start, stop, batch):
        index = torch.arange(i, min(i + batch, stop))
        kept, filler = len(index), batch - len(index)
        if filler:
            index = torch.cat([index, index[-1:].expand(filler)])
        images = train.inputs[index.to(train.inputs.device)]  # read once for all views (decoded, when streamed)
        per_view = []
        for view_id in view_ids.tolist():
            ids = torch.full_like(index, view_id)
            inputs = view_space.apply(images, index, ids) if data.is_image else images
            sample_index = views.sample_index(index, ids)
            if cfg.draws:
                draws = at_temperature(teacher.draws_at(inputs, sample_index), t_teacher, cfg.temper)  # [S, B, C]
                if len(draws) < cfg.draws:
                    raise BcpkdError(f"calibrate.draws={cfg.draws}: a {teacher.kind.value} teacher draws {len(draws)} "
                                     f"per example (vi, mc-dropout and ensembles draw their samples; laplace with "
                                     f"link mc); lower calibrate.draws")
                per_view.append(draws[:cfg.draws].transpose(0, 1))  # [B, K, C]
            else:
                probs = at_temperature(teacher.predictive_at(inputs, sample_index), t_teacher, cfg.temper)
                per_view.append(topk.compress(probs, min(cfg.top_k, data.n_classes)) if cfg.top_k else probs)
        if cfg.top_k:
            chunks.append(tuple(torch.stack(part, dim=1)[:kept].cpu() for part in zip(*per_view)))
        else:
            chunks.append(torch.stack(per_view, dim=1)[:kept].cpu())
    dtype = getattr(torch, cfg.cache_dtype.value)
    if cfg.top_k:
        return TopKProbs(torch.cat([v for v, _ in chunks]).to(dtype), torch.cat([i for _, i in chunks]), data.n_classes)
    return torch.cat(chunks).to(dtype)


def cache_bytes(n_rows: int, n_classes: int, cfg: CalibrateConfig) -> int:
    """Bytes of the tensors of a cache of `n_rows` training rows (its header aside): probs [N, V, C] at
    calibrate.cache_dtype ([N, V, K, C] with calibrate.draws K); with calibrate.top_k K, K values and K int32 ids
    per row and view slot."""
    value = getattr(torch, cfg.cache_dtype.value).itemsize
    if cfg.top_k:
        return n_rows * cfg.views * min(cfg.top_k, n_classes) * (value + torch.int32.itemsize)
    return n_rows * cfg.views * max(cfg.draws, 1) * n_classes * value


def require_cache_space(path: Path, teacher_path: Path, data: Dataset, cfg: CalibrateConfig) -> None:
    """Refuse (BcpkdError) a cache that would not fit in its folder: its rows (all shards of a build in shards
    land there too) and the calibrated teacher.pt next to it (about the size of the teacher's file)."""
    smaller = (["a smaller calibrate.top_k"] if cfg.top_k else [] if cfg.draws else ["calibrate.top_k=K"]) + \
        (["fewer calibrate.draws"] if cfg.draws else []) + \
        (["calibrate.cache_dtype=float16"] if cfg.cache_dtype == CacheDtype.float32 else []) + \
        (["fewer calibrate.views"] if cfg.views > 1 else [])
    fix = "free space, build it elsewhere (calibrate --out DIR; distill --cache DIR/bcp.safetensors)" + \
        (f", or make it smaller ({', '.join(smaller)})" if smaller else "")
    size = cache_bytes(len(data.train), data.n_classes, cfg) + Path(teacher_path).stat().st_size
    require_space(path.parent, size, "the BCP cache", fix)


def cache_expectations(teacher_path: Path, data: Dataset, t_teacher: float, cfg: CalibrateConfig) -> dict:
    """Metadata a cache must carry to serve this teacher, data and T_t (dealbreakers when loading)."""
    tempered = {"temper": cfg.temper.value} if cfg.temper != Temper.logits else {}  # older caches: logits
    if cfg.views > 1 and data.is_image:  # older caches: pad crops, zeros
        tempered.update(data.views.settings())
    if cfg.draws:  # older caches: none
        tempered["n_draws"] = cfg.draws
    if cfg.top_k:  # older caches: dense
        tempered["top_k"] = min(cfg.top_k, data.n_classes)
    return {"teacher_sha256": artifacts.sha256_file(teacher_path), "data_fingerprint": data.fingerprint,
            "t_teacher": t_teacher, **tempered, "n_examples": len(data.train), "n_views": cfg.views,
            "predictive_version": PREDICTIVE_VERSION}


def ensure_cache(teacher_path: Path, payload: dict, data: Dataset, cfg: CalibrateConfig, t_teacher: float,
                 device: torch.device, out: str = "", n_bins: int = 15, force: bool = False) -> tuple[Path, bool]:
    """Find the cache made for this teacher, data and settings, or calibrate and build it (`force`: build it
    again even if it exists). Under torchrun every process calls this: rank 0 alone takes the lock and decides
    for all, and they build the cache in shards together.

    `data` is on `device`. Returns (absolute path of bcp.safetensors, whether it was built now).
    """
    require_classes(str(teacher_path), payload["data"].get("classes"), data)
    if len(data.heldout) == 0 and (cfg.prior == PriorTuning.gridsearch or cfg.temperature == TemperatureFit.fit):
        raise BcpkdError("data.n_heldout=0: calibrate tunes on held-out data (calibrate.prior=gridsearch or "
                         "calibrate.temperature=fit); keep a held-out split, or --set calibrate.prior=keep "
                         "(or marglik) and calibrate.temperature=none")
    expect = cache_expectations(teacher_path, data, t_teacher, cfg)
    key = cache_key(expect["teacher_sha256"], data.fingerprint, cfg, t_teacher,
                    data.views.settings() if data.is_image else {})
    path = cache_path(teacher_path, key, out).resolve()
    place = world()
    lock = artifacts.exclusive_lock(path.parent / ".lock", f"waiting for another job building the cache {path}") \
        if place.is_main else contextlib.nullcontext()
    with lock:
        built = _decide_build(path, force, place, lambda: require_cache_space(path, teacher_path, data, cfg))
        if built:
            _build_cache(path, teacher_path, payload, data, cfg, t_teacher, device, n_bins, expect, place)
    if not built:  # refuses a stale or foreign cache; its rows are checked where they are read (load_cache)
        artifacts.check_cache_metadata(path, expect)
    return path, built


def _decide_build(path: Path, force: bool, place: World, require_space: Callable[[], None]) -> bool:
    """Whether to build the cache: rank 0's answer, for every process; rank 0's refusal (`require_space`, before
    any teacher inference) raised in every process. A build in shards first removes the cache there, so that a
    crash leaves no manifest over half-replaced shards."""
    built, refusal = force or not path.is_file(), None
    if built and place.is_main:
        try:
            require_space()
        except BcpkdError as err:
            refusal = str(err)
        if refusal is None and place.size > 1:
            path.unlink(missing_ok=True)
    built, refusal = _from_main((built, refusal), place)
    if refusal:
        raise BcpkdError(refusal)
    return built


def _from_main(value, place: World):
    """Rank 0's `value` in every process."""
    if place.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def ensure_calibrated(teacher_path: Path, payload: dict, data: Dataset, cfg: CalibrateConfig, t_teacher: float,
                      device: torch.device, n_bins: int = 15) -> Path:
    """The calibrated teacher.pt for this teacher, data and calibrate settings, without a cache: found in the
    folder a cache of them has (or would have), or calibrated now and written there (with report.json). What
    `--targets online` runs on every batch."""
    require_classes(str(teacher_path), payload["data"].get("classes"), data)
    expect = cache_expectations(teacher_path, data, t_teacher, cfg)
    folder = cache_path(teacher_path, cache_key(expect["teacher_sha256"], data.fingerprint, cfg, t_teacher,
                                                data.views.settings() if data.is_image else {}), "").resolve().parent
    place = world()
    lock = artifacts.exclusive_lock(folder / ".lock", f"waiting for another job calibrating in {folder}") \
        if place.is_main else contextlib.nullcontext()
    with lock:
        if not _from_main((folder / "teacher.pt").is_file(), place):
            _calibrate_and_save(folder, teacher_path, payload, data, cfg, device, n_bins, expect, place,
                                "to run on every batch (no cache: --targets online)")
    return folder / "teacher.pt"


def _calibrate_and_save(folder: Path, teacher_path: Path, payload: dict, data: Dataset, cfg: CalibrateConfig,
                        device: torch.device, n_bins: int, expect: dict, place: World, purpose: str) -> Teacher:
    """Calibrate the teacher on held-out data; rank 0 writes the calibrated teacher.pt and report.json into
    `folder`. Under torchrun every process calibrates (the same inputs give the same teacher: checked)."""
    if len(data.heldout) == 0 and (cfg.prior == PriorTuning.gridsearch or cfg.temperature == TemperatureFit.fit):
        raise BcpkdError("data.n_heldout=0: calibrate tunes on held-out data (calibrate.prior=gridsearch or "
                         "calibrate.temperature=fit); keep a held-out split, or --set calibrate.prior=keep "
                         "(or marglik) and calibrate.temperature=none")
    teacher = load_teacher(payload, device)
    console.print(f"calibrating {teacher_label(teacher.kind)} {teacher_path} on {len(data.heldout)} held-out examples "
                  f"(prior {cfg.prior.value}, temperature {cfg.temperature.value}) {purpose}")
    report = calibrate(teacher, data, cfg, n_bins)
    _require_equal_calibrations(report, place)
    teacher_recipe = build_recipe(payload["config"], "checkpoint config")
    if place.is_main:
        record = recipe_record(replace(teacher_recipe, calibrate=cfg), (*TEACHER_RECORD, "calibrate"))
        calibrated = teacher_payload(teacher, payload["model"], record, payload["data"],
                                     parent_sha256=expect["teacher_sha256"], history={"calibration": report})
        artifacts.save_checkpoint(folder / "teacher.pt", calibrated)
        artifacts.write_json(folder / "report.json", report)
    return teacher


def _build_cache(path: Path, teacher_path: Path, payload: dict, data: Dataset, cfg: CalibrateConfig,
                 t_teacher: float, device: torch.device, n_bins: int, expect: dict, place: World) -> None:
    """Calibrate the teacher, then write the calibrated teacher.pt, report.json and bcp.safetensors. Under
    torchrun every process calibrates the teacher (the same inputs give the same teacher: checked) and computes
    its block of rows; rank 0 writes the calibrated teacher, the report and, once every shard is written, the
    manifest."""
    teacher = _calibrate_and_save(path.parent, teacher_path, payload, data, cfg, device, n_bins, expect, place,
                                  f"for a cache at T_t = {t_teacher} (tempering the {cfg.temper.value})")
    teacher_recipe = build_recipe(payload["config"], "checkpoint config")
    batch = inference_batch(cfg, device)
    chosen = f" (calibrate.batch_size=0: chosen for {device.type})" if not cfg.batch_size else ""
    in_shards = f" in {place.size} shards, one per process," if place.size > 1 else ""
    console.print(f"building the cache{in_shards} in batches of {batch}{chosen}")
    rows = shard_rows(len(data.train), batch, place.rank, place.size)
    probs = build_cache_probs(teacher, data, t_teacher, replace(cfg, batch_size=batch), rows) \
        if rows[1] > rows[0] else None
    if place.size == 1:
        artifacts.save_cache(path, probs, _cache_metadata(path, teacher, teacher_recipe, data, cfg, expect, batch))
        _remove_shards(path, keep=[])
        return
    shard = None if probs is None else \
        artifacts.save_cache_shard(path.parent / shard_name(path, place.rank, place.size), probs, rows, path)
    shards = [entry for entry in _gathered(shard, place) if entry is not None]  # every shard is written
    if place.is_main:
        artifacts.save_cache_manifest(path, shards,
                                      _cache_metadata(path, teacher, teacher_recipe, data, cfg, expect, batch))
        _remove_shards(path, keep=[entry["file"] for entry in shards])
    dist.barrier()  # the manifest is there before any process reads the cache


def _cache_metadata(path: Path, teacher: Teacher, teacher_recipe: Recipe, data: Dataset, cfg: CalibrateConfig,
                    expect: dict, batch: int) -> dict:
    """The cache's provenance header (after the calibrated teacher.pt is written); `batch`: the inference batch
    it was built in (and `threads`, the intra-op threads of each process that built it)."""
    augmentation = data.views.describe() if data.is_image else "none"
    return {**expect, "n_classes": data.n_classes, "classes": list(data.classes),
            "calibrated_teacher_sha256": artifacts.sha256_file(path.parent / "teacher.pt"),
            "split": "train", "views": {"ids": cache_view_ids(data, cfg).tolist(), "augmentation": augmentation},
            "bayes": teacher.kind.value, "method": teacher.method_settings(teacher_recipe.teacher),
            "predictive": teacher.predictive_settings(), "calibrate": to_plain(cfg),
            "dtype": cfg.cache_dtype.value, "inference_batch_size": batch, "threads": torch.get_num_threads(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _gathered(value, place: World) -> list:
    """[value of rank 0, rank 1, ...] in every process (every process calls this at the same point)."""
    values: list = [None] * place.size
    dist.all_gather_object(values, value)
    return values


def _require_equal_calibrations(report: dict, place: World) -> None:
    """Every process calibrated the same teacher (its shard must be the one-process cache's rows)."""
    if place.size > 1 and len(set(_gathered(json.dumps(report, sort_keys=True), place))) > 1:
        raise BcpkdFailure(f"the {place.size} processes calibrated the teacher differently (non-deterministic "
                           f"kernels?); build the cache in one process: bcpkd calibrate --teacher TEACHER.pt")


def _remove_shards(path: Path, keep: list[str]) -> None:
    """Shard files of earlier builds of this cache, which its new file or manifest does not list."""
    for file in shard_files(path):
        if file.name not in keep:
            file.unlink(missing_ok=True)
