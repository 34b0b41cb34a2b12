"""Datasets as in-memory tensors with train / held-out / test splits, and their fingerprints."""

from __future__ import annotations

import hashlib
from pathlib import Path
from dataclasses import dataclass, replace

import torch

from bcpkd_cli.choices import Decode
from bcpkd_cli.config import DataConfig, DatasetName, plain_data
from bcpkd_cli.console import line
from bcpkd_cli.data import arrays, folders, images, synthetic, text_tables, views
from bcpkd_cli.data.text import Corpus, TextRows, split_fingerprint
from bcpkd_cli.data.decode import square
from bcpkd_cli.data.rows import MappedRows, RowReader, StreamedRows, default_workers
from bcpkd_cli.errors import BcpkdError


@dataclass(frozen=True)
class Split:
    """One split: inputs [N, ...], labels [N], and exact BCPs [N, C] where the dataset knows them."""

    inputs: torch.Tensor | RowReader | TextRows  # RowReader: images read per batch (a mapped store, or the files);
    # TextRows: text, read as token ids of the model's own tokenizer
    labels: torch.Tensor
    true_bcp: torch.Tensor | None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, rows: torch.Tensor) -> "Split":
        rows = rows.to(self.labels.device)
        inputs = self.inputs.subset(rows) if isinstance(self.inputs, (RowReader, TextRows)) else self.inputs[rows]
        return Split(inputs, self.labels[rows], None if self.true_bcp is None else self.true_bcp[rows])

    def to(self, device: torch.device) -> "Split":
        """The split on `device`; images that would take over half of a GPU's free memory stay in host memory
        and go there a batch at a time."""
        bcp = None if self.true_bcp is None else self.true_bcp.to(device)
        inputs = self.inputs
        if isinstance(inputs, torch.Tensor) and inputs.ndim == 4 and torch.device(device).type == "cuda" \
                and inputs.nbytes > torch.cuda.mem_get_info(device)[0] // 2:
            inputs = MappedRows(inputs, torch.arange(len(inputs)))
        return Split(inputs.to(device), self.labels.to(device), bcp)


@dataclass(frozen=True)
class Dataset:
    train: Split
    heldout: Split
    test: Split
    n_classes: int
    input_shape: tuple[int, ...]
    fingerprint: str
    seed: int
    classes: tuple[str, ...] = ()  # the class names, in label order
    notes: tuple[str, ...] = ()  # what a person should know of how it was read (files left out, small classes)
    config: DataConfig | None = None  # what it was loaded from
    stats: dict | None = None  # images: the training files' channel mean and std ({"mean": [C], "std": [C]});
    # vectors: the training split's per-feature mean and std ([D] each), unless data.standardize is off

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3

    @property
    def is_text(self) -> bool:
        return isinstance(self.train.inputs, TextRows)

    @property
    def views(self) -> views.ViewSpace:
        """How augmentation views are made (data.crop, data.view_padding; resized crops seeded by data.seed and
        interpolated where the training images are)."""
        if self.config is None:
            return views.ViewSpace()
        return views.ViewSpace(self.config.crop.value, self.config.view_padding.value, self.config.seed,
                               self.train.inputs.device.type)

    def split(self, name: str) -> Split:
        return {"train": self.train, "heldout": self.heldout, "test": self.test}[name]

    def sizes(self) -> dict[str, int]:
        """The split sizes as the data keys that set them ({"data.n_train": N, ...}): what config.yaml says beside
        keys left to their defaults."""
        return {"data.n_train": len(self.train), "data.n_heldout": len(self.heldout), "data.n_test": len(self.test)}

    def info(self) -> dict:
        """What an artifact records of the data it was made from: the fingerprint, the config (without the
        keys its dataset does not read), the class count and the split sizes."""
        return {"fingerprint": self.fingerprint, "config": plain_data(self.config) if self.config else {},
                "n_classes": self.n_classes, "classes": list(self.classes), "input_shape": list(self.input_shape), "stats": self.stats,
                "sizes": {name: len(self.split(name)) for name in ("train", "heldout", "test")}}

    def to(self, device: torch.device) -> "Dataset":
        """The same dataset with every split's tensors on `device`. The fingerprint is unchanged, except where
        images are streamed from JPEG files to a GPU: its decoder's pixels differ from the CPU decoder's."""
        moved = replace(self, train=self.train.to(device), heldout=self.heldout.to(device), test=self.test.to(device))

        def nvjpeg(data: Dataset) -> bool:
            return isinstance(data.train.inputs, StreamedRows) and data.train.inputs.on_gpu

        if nvjpeg(moved) and not nvjpeg(self):
            moved = replace(moved, fingerprint=hashlib.sha256(f"{self.fingerprint}/nvjpeg".encode()).hexdigest()[:16])
        return moved


def fingerprint(splits: list[Split], rows_per_block: int = 4096) -> str:
    """SHA-256 (first 16 hex digits) over the bytes of every split's inputs and labels (read in blocks)."""
    digest = hashlib.sha256()
    for s in splits:
        for start in range(0, len(s.inputs), rows_per_block):
            digest.update(s.inputs[start:start + rows_per_block].contiguous().numpy().tobytes())
        digest.update(s.labels.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def folder_fingerprint(sources: str, rows: list[torch.Tensor], labels: list[torch.Tensor]) -> str:
    """An image folder's fingerprint without reading pixels: SHA-256 (16 hex digits) over its files'
    fingerprint and decoding (`sources`: relative paths, sizes, image size) and each split's file rows and
    labels. The same for decode=store and decode=stream, so caches serve both."""
    digest = hashlib.sha256(sources.encode())
    for split_rows, split_labels in zip(rows, labels):
        digest.update(split_rows.numpy().tobytes())
        digest.update(split_labels.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _generator(seed: int, stream: str) -> torch.Generator:
    """An independent generator per (seed, stream): a split does not change when another one's size does."""
    return torch.Generator().manual_seed(int(hashlib.sha256(f"{seed}/{stream}".encode()).hexdigest()[:15], 16))


def few_shot_rows(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Sorted row indices of `per_class` seeded examples of every class (all of a smaller class)."""
    order = torch.randperm(len(labels), generator=_generator(seed, "few-shot"))
    shuffled = labels.cpu()[order]
    picks = [order[shuffled == c][:per_class] for c in shuffled.unique()]
    return torch.cat(picks).sort().values


def synthetic_means(cfg: DataConfig) -> torch.Tensor:
    """The class means [C, D] of the synthetic dataset a config names."""
    return synthetic.class_means(cfg, _generator(cfg.seed, "means"))


SYNTHETIC_SIZES = (22500, 2500, 10000)  # train, held-out, test when the config says 0
IMAGE_HELDOUT = 5000


def feature_stats(features: torch.Tensor) -> dict:
    """Per-feature mean and standard deviation of the training split's vectors [N, D] (a constant feature: 1)."""
    std = features.double().std(dim=0, unbiased=False)
    return {"mean": features.double().mean(dim=0).tolist(), "std": torch.where(std > 0, std, 1.0).tolist()}


def _synthetic(cfg: DataConfig) -> Dataset:
    means = synthetic_means(cfg)
    sizes = [cfg.n_train or SYNTHETIC_SIZES[0], check_sizes(cfg), cfg.n_test or SYNTHETIC_SIZES[2]]
    splits = [Split(*synthetic.sample_split(n, means, cfg.noise_var, _generator(cfg.seed, name)))
              for name, n in zip(("train", "heldout", "test"), sizes)]
    return Dataset(*splits, n_classes=cfg.n_classes, input_shape=(cfg.dim,), fingerprint=fingerprint(splits),
                   seed=cfg.seed, classes=tuple(str(c) for c in range(cfg.n_classes)), config=cfg, stats=feature_stats(splits[0].inputs) if cfg.standardize else None)


def _cifar_split(cfg: DataConfig, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10/100's `split`: uint8 images [N, 3, S, S] (at data.image_size, if set) and labels [N]."""
    pixels, labels = images.read_cifar(Path(cfg.root), cfg.name.value, split, cfg.download)
    if cfg.image_size and cfg.image_size != pixels.shape[-1]:
        pixels = torch.stack([square(image, cfg.image_size) for image in pixels])
    return pixels, labels


CIFAR_SIZES = (50_000, 10_000)  # training and test images of the python batches


def image_counts(cfg: DataConfig) -> tuple[int, int]:
    """The number of training and test images a config's folder holds, without decoding any."""
    if cfg.name == DatasetName.synthetic:
        raise ValueError("the synthetic dataset has no files")
    if cfg.name == DatasetName.imagefolder:
        return tuple(len(images.list_image_folder(Path(cfg.root) / split).paths) for split in ("train", "test"))
    return CIFAR_SIZES


def check_sizes(cfg: DataConfig, counts: tuple[int, int] | None = None) -> int:
    """Refuse split sizes the images (or rows) cannot fill, before any work; the held-out size it uses."""
    if cfg.name == DatasetName.synthetic:
        return SYNTHETIC_SIZES[1] if cfg.n_heldout < 0 else cfg.n_heldout
    if counts is None and cfg.name in (DatasetName.arrays, DatasetName.text, DatasetName.hf):
        return 0  # checked when the file is read
    n_files, n_test_files = counts or image_counts(cfg)
    n_heldout = min(IMAGE_HELDOUT, n_files // 10) if cfg.n_heldout < 0 else cfg.n_heldout
    fix = "lower them with --set data.n_train=N --set data.n_heldout=N --set data.n_test=N (0: all that is there)"
    if n_heldout + max(cfg.n_train, 1) > n_files:
        raise BcpkdError(f"data.n_train={cfg.n_train} + data.n_heldout={n_heldout}: {cfg.root} holds only {n_files} "
                         f"training {'images' if cfg.name in (DatasetName.imagefolder, DatasetName.cifar10, DatasetName.cifar100) else 'examples'}; {fix}")
    if cfg.n_test > n_test_files:
        raise BcpkdError(f"data.n_test={cfg.n_test}: {cfg.root} holds only {n_test_files} test images; {fix}")
    return n_heldout


def _images(cfg: DataConfig) -> Dataset:
    """Train / held-out from the training files (seeded split), test from the test files, labelled by the
    training split's class names."""
    if cfg.name == DatasetName.imagefolder:
        train = folders.read_split(cfg, "train")
        test = folders.read_split(cfg, "test", train.classes)
        folders.refuse_unreadable([train, test])
        (train_pixels, train_labels), (test_pixels, test_labels) = (train.pixels, train.labels), (test.pixels, test.labels)
        classes, stats = train.classes, train.stats
        notes = [f"{train.note}, {test.note}", *folders.class_notes(classes, train_labels, test_labels)]
    else:
        (train_pixels, train_labels), (test_pixels, test_labels) = _cifar_split(cfg, "train"), _cifar_split(cfg, "test")
        classes = list(images.CIFAR10_CLASSES if cfg.name == DatasetName.cifar10 else images.CIFAR100_CLASSES)
        stats, notes = images.channel_stats(train_pixels), []
    n_heldout = check_sizes(cfg, (len(train_labels), len(test_labels)))
    order = torch.randperm(len(train_labels), generator=_generator(cfg.seed, "heldout"))
    heldout_rows = order[:n_heldout].sort().values
    train_rows = order[n_heldout:][: cfg.n_train or None].sort().values
    test_rows = torch.arange(len(test_labels))[: cfg.n_test or None]

    def rows_of(pixels: torch.Tensor | RowReader, rows: torch.Tensor):  # images read per batch stay unread
        return pixels.subset(rows) if isinstance(pixels, RowReader) else pixels[rows]

    splits = [Split(rows_of(train_pixels, train_rows), train_labels[train_rows], None),
              Split(rows_of(train_pixels, heldout_rows), train_labels[heldout_rows], None),
              Split(rows_of(test_pixels, test_rows), test_labels[test_rows], None)]
    if cfg.name == DatasetName.imagefolder:  # from its files, without reading the pixels again
        rows = [train_rows, heldout_rows, test_rows]
        data_fingerprint = folder_fingerprint(train.sources + test.sources, rows, [s.labels for s in splits])
    else:
        data_fingerprint = fingerprint(splits)
    return Dataset(*splits, n_classes=len(classes), input_shape=tuple(train_pixels.shape[1:]),
                   fingerprint=data_fingerprint, seed=cfg.seed, classes=tuple(classes), config=cfg, stats=stats,
                   notes=tuple(notes))


def _arrays(cfg: DataConfig) -> Dataset:
    """Train / held-out from the file's training rows (seeded split); test from its x_test, y_test, or else a
    seeded fifth of its rows (data.n_test of them, if set)."""
    x, y, test, classes = arrays.read_arrays(Path(cfg.root), cfg.label_column)
    if test is None:
        order = torch.randperm(len(y), generator=_generator(cfg.seed, "test"))
        n_test = cfg.n_test or max(1, len(y) // 5)
        if n_test >= len(y):
            raise BcpkdError(f"data.n_test={n_test}: {cfg.root} holds only {len(y)} rows")
        test_rows, rest = order[:n_test].sort().values, order[n_test:].sort().values
        test, x, y = (x[test_rows], y[test_rows]), x[rest], y[rest]
    n_heldout = check_sizes(cfg, (len(y), len(test[1])))
    order = torch.randperm(len(y), generator=_generator(cfg.seed, "heldout"))
    heldout_rows = order[:n_heldout].sort().values
    train_rows = order[n_heldout:][: cfg.n_train or None].sort().values
    splits = [Split(x[train_rows], y[train_rows], None), Split(x[heldout_rows], y[heldout_rows], None),
              Split(test[0][: cfg.n_test or None], test[1][: cfg.n_test or None], None)]
    return Dataset(*splits, n_classes=len(classes), input_shape=(x.shape[1],), fingerprint=fingerprint(splits),
                   seed=cfg.seed, classes=tuple(classes), config=cfg, stats=feature_stats(splits[0].inputs) if cfg.standardize else None)


def _class_ids(source: text_tables.TextSource, where: str) -> tuple[list[str], list[torch.Tensor]]:
    """Class names and each split's label ids: integer labels index the source's names (else "0".."C-1"); string
    labels are named by the training split's sorted distinct values, and every split is labelled by name."""
    splits = [source.train] + ([source.test] if source.test is not None else [])
    if all(isinstance(v, int) for s in splits for v in s.labels):
        top = max(max(s.labels) for s in splits)
        classes = source.classes or [str(c) for c in range(max(source.train.labels) + 1)]
        if min(min(s.labels) for s in splits) < 0 or top >= len(classes):
            raise BcpkdError(f"{where}: labels run from {min(min(s.labels) for s in splits)} to {top}, but there are "
                             f"{len(classes)} training classes; labels must be 0..C-1 (or class names)")
        return classes, [torch.tensor(s.labels, dtype=torch.int64) for s in splits]
    classes = sorted({str(v) for v in source.train.labels})
    index = {name: label for label, name in enumerate(classes)}
    for s in splits:
        unknown = sorted({str(v) for v in s.labels} - set(index))
        if unknown:
            raise BcpkdError(f"{where}: label {unknown[0]!r} of the test examples is no training class "
                             f"({', '.join(classes[:8])}{', ...' if len(classes) > 8 else ''})")
    return classes, [torch.tensor([index[str(v)] for v in s.labels], dtype=torch.int64) for s in splits]


def _text(cfg: DataConfig) -> Dataset:
    """Text: train / held-out from the training examples (seeded split); test from the test examples, or else a
    seeded fifth of the training examples (data.n_test of them, if set). Token ids are kept beside a local
    source (or in the user's cache folder) per tokenizer."""
    columns = (cfg.text_column, cfg.text_pair_column, cfg.label_column)
    if cfg.name == DatasetName.hf:
        source = text_tables.read_hf(cfg.root, *columns)
        store = images.store_folder(Path(cfg.root)) if Path(cfg.root).is_dir() else \
            images.store_folder(Path.home() / ".cache" / "bcpkd" / "text")
    else:
        root = Path(cfg.root)
        source = text_tables.read_tables(root, *columns)
        store = images.store_folder(root if root.is_dir() else root.parent)
    classes, labels = _class_ids(source, cfg.root)
    n_train = len(source.train.texts)
    texts = source.train.texts + (source.test.texts if source.test else [])
    pairs = None if cfg.text_pair_column == "" else source.train.pairs + (source.test.pairs if source.test else [])
    corpus = Corpus(texts, pairs, cfg.max_length, store)
    if source.test is None:
        order = torch.randperm(n_train, generator=_generator(cfg.seed, "test"))
        n_test = cfg.n_test or max(1, n_train // 5)
        if n_test >= n_train:
            raise BcpkdError(f"data.n_test={n_test}: {cfg.root} holds only {n_train} examples")
        test_rows, rest = order[:n_test].sort().values, order[n_test:].sort().values
    else:
        test_rows = torch.arange(n_train, len(texts))[: cfg.n_test or None]
        rest = torch.arange(n_train)
    all_labels = torch.cat(labels)
    n_heldout = check_sizes(cfg, (len(rest), len(test_rows)))
    order = torch.randperm(len(rest), generator=_generator(cfg.seed, "heldout"))
    heldout_rows = rest[order[:n_heldout].sort().values]
    train_rows = rest[order[n_heldout:][: cfg.n_train or None].sort().values]
    rows = [train_rows, heldout_rows, test_rows]
    splits = [Split(TextRows(corpus, r), all_labels[r], None) for r in rows]
    return Dataset(*splits, n_classes=len(classes), input_shape=(), seed=cfg.seed, classes=tuple(classes),
                   fingerprint=split_fingerprint(corpus, rows, [s.labels for s in splits]), config=cfg)


def require_classes(artifact: str, classes: list[str] | None, data: Dataset) -> None:
    """Refuse data whose class names (in label order) are not those an artifact was made for (an artifact from
    before class names were stored passes)."""
    if classes and list(classes) != list(data.classes):
        differ = next((i for i, (a, b) in enumerate(zip(classes, data.classes)) if a != b), min(len(classes),
                                                                                              len(data.classes)))
        raise BcpkdError(f"{artifact}: made for {len(classes)} classes ({', '.join(classes[:6])}"
                         f"{', ...' if len(classes) > 6 else ''}) but the data have {len(data.classes)} "
                         f"({', '.join(data.classes[:6])}{', ...' if len(data.classes) > 6 else ''}; they differ at "
                         f"label {differ}); use the data it was made with (drop --data/--data-root)")


def summary(data: Dataset) -> str:
    """One line: the dataset, its classes and split sizes."""
    cfg = data.config
    where = f" {cfg.root}" if cfg is not None and cfg.root else ""
    names = ", ".join(data.classes[:10]) + (", ..." if len(data.classes) > 10 else "")
    return (f"data: {getattr(cfg.name, 'value', cfg.name) if cfg else 'dataset'}{where}: {data.n_classes} classes ({names}); "
            f"{len(data.train)} train, {len(data.heldout)} held-out, {len(data.test)} test examples")


def brief(data: Dataset) -> str:
    """The dataset in a few words, for a stage's first line: `cifar10 data/cifar (45,000 train examples)`."""
    cfg = data.config
    where = f" {cfg.root}" if cfg is not None and cfg.root else ""
    return f"{getattr(cfg.name, 'value', cfg.name) if cfg else 'dataset'}{where} ({len(data.train):,} train examples)"


def announce(data: Dataset) -> None:
    """Say on stderr what data a stage works on: `summary` and the notes of how it was read."""
    for text in (summary(data), *data.notes):
        line(text)


def decoding_workers(cfg: DataConfig) -> int:
    """The loader worker processes that decode images while the network computes (a streamed image folder's);
    0 when batches come from memory."""
    if cfg.name == DatasetName.imagefolder and cfg.decode == Decode.stream:
        return cfg.loader_workers or default_workers()
    return 0


def load_dataset(cfg: DataConfig) -> Dataset:
    """Build the dataset a config names; the class means / held-out carving and each split come from cfg.seed."""
    if cfg.name == DatasetName.synthetic:
        return _synthetic(cfg)
    if cfg.name in (DatasetName.text, DatasetName.hf):
        return _text(cfg)
    return _arrays(cfg) if cfg.name == DatasetName.arrays else _images(cfg)
