"""Data for training and evaluation through timm's data pipeline: Fashion-MNIST, timm dataset names, folders.

Three disjoint splits: training, calibration (carved from the training data with the recipe's seed) and evaluation.
An image folder is evaluated on its val/, validation/ or test/ folder; without one, a fixed share of train/ is held
out (always the same images, whatever the seed), so a model is never evaluated on images it was trained on. A
corrupt or unreadable image stops the run with one line naming the file (rather than silently shrinking a data set).
"""
import difflib
import gzip
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, cast

import torch
from PIL import Image
from timm.data import create_dataset, create_transform, dataset_factory
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from ..errors import DynamizeError
from ..io.atomic import write_file

FASHION_MNIST = "fashion-mnist"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
_FMNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte")
_FMNIST_STATS = ((0.2860,), (0.3530,))
_TIMM_PREFIXES = ("torch", "hfds", "hfids", "tfds", "wds")  # timm dataset names look like torch/cifar10
# The torchvision data sets that timm opens as torch/NAME from their folder alone, from timm's own table; it is
# private, so a timm without it costs only the hint that a bare `--data cifar10` means torch/cifar10.
_TORCH_DATASETS = tuple(getattr(dataset_factory, "_TORCH_BASIC_DS", ()))
_VERIFY_LIMIT = 50_000
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
TRAIN_SPLITS = ("train", "training")
EVAL_SPLITS = ("val", "validation", "test")  # in this order of preference
_HELD_OUT_SEED = 20_200_101  # fixed: every run and report on a folder without val/ evaluates on the same images


class DataError(DynamizeError):
    """Data that is missing, empty, malformed or does not fit the model."""


def cache_dir() -> Path:
    return Path(os.environ.get("DYNAMIZE_CACHE", Path.home() / ".cache" / "dynamize"))


def _fashion_mnist_root(data_dir: Path | None) -> Path:
    """A torchvision-style root (ROOT/FashionMNIST/raw/ with unpacked idx files) for the four idx files, found in
    `data_dir` when it is given (never elsewhere: the user asked for those files), else where Debian puts them.

    A root that already is one is used as it is; other files are unpacked into a cache folder of their own (see
    `_fashion_mnist_cache`), so the cache never serves the files of another source.
    """
    src = data_dir if data_dir is not None else DEBIAN_FASHION_MNIST
    if all((src / "FashionMNIST" / "raw" / f).is_file() for f in _FMNIST_FILES):
        return src
    for base in (src, src / "FashionMNIST" / "raw"):
        if all((base / f).is_file() or (base / f"{f}.gz").is_file() for f in _FMNIST_FILES):
            root = _fashion_mnist_cache(base)
            raw = root / "FashionMNIST" / "raw"
            raw.mkdir(parents=True, exist_ok=True)
            for f in _FMNIST_FILES:
                if not (raw / f).is_file():
                    src_file = base / f
                    write_file(raw / f, lambda tmp: _unpack(src_file, tmp))
            return root
    if data_dir is not None:
        raise DataError(f"Fashion-MNIST idx files not found in {data_dir} (nor in {data_dir}/FashionMNIST/raw); "
                        f"pass the folder that holds {', '.join(_FMNIST_FILES)} (or .gz), or leave out --data-dir")
    raise DataError(f"Fashion-MNIST idx files not found in {DEBIAN_FASHION_MNIST}; `apt-get install "
                    "dataset-fashion-mnist` (Debian) or pass --data-dir with the four idx(.gz) files")


def _fashion_mnist_cache(base: Path) -> Path:
    """The cache folder for the idx files in `base`: named by a hash of each file's resolved path, size and
    modification time, so that other files, or the same files changed, are unpacked afresh."""
    sources = [base / f if (base / f).is_file() else base / f"{f}.gz" for f in _FMNIST_FILES]
    stamps = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in sources]
    key = hashlib.sha256(json.dumps(stamps).encode()).hexdigest()[:16]
    return cache_dir() / "fashion-mnist" / key


def _unpack(src: Path, dest: Path) -> None:
    """Copy an idx file, gunzipping `src.gz` when only that exists (torchvision reads the unpacked files)."""
    with (open(src, "rb") if src.is_file() else gzip.open(src.with_name(src.name + ".gz"), "rb")) as fin, \
            open(dest, "wb") as fout:
        shutil.copyfileobj(fin, fout)


class _Images(Dataset):
    """A dataset whose PIL images are converted to the model's channel mode, with readable errors."""

    def __init__(self, ds, mode: str, transform):
        self.ds, self.mode, self.transform = ds, mode, transform

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        try:
            img, target = self.ds[i]
            img = img.convert(self.mode)
        except (OSError, ValueError, SyntaxError) as e:
            name = self.ds.filename(i) if hasattr(self.ds, "filename") else f"item {i}"
            raise DataError(f"cannot read image {name} ({type(e).__name__}); remove or replace it") from None
        return self.transform(img), target


@dataclass
class DataSpec:
    """Where the data is and how the model sees it."""
    name: str
    data_dir: str | None = None
    img_size: int = 32
    in_chans: int = 1


def _folder_splits(root: Path) -> tuple[Path, Path | None]:
    """The training folder and the evaluation folder (None if there is none) of an image-folder data set, checked.

    Raises:
        DataError: no such folder, no train/, fewer than 2 classes, no images, an evaluation class that training
            lacks, or an unreadable image.
    """
    if not root.exists():
        raise DataError(f"data folder {root} does not exist{_data_hint(str(root))}")
    if not root.is_dir():
        raise DataError(f"data path {root} is not a folder")
    splits = {p.name: p for p in root.iterdir() if p.is_dir()}
    if not splits:
        raise DataError(f"data folder {root} is empty; expected train/CLASS/*.png and val/CLASS/*.png")
    train = next((splits[n] for n in TRAIN_SPLITS if n in splits), None)
    if train is None:
        raise DataError(f"data folder {root} has no train/ split (expected train/CLASS/*.png)")
    evaluation = next((splits[n] for n in EVAL_SPLITS if n in splits), None)
    classes = {}
    for split in [s for s in (train, evaluation) if s is not None]:
        folders = [p for p in split.iterdir() if p.is_dir()]
        if len(folders) < 2:
            raise DataError(f"{split} has {len(folders)} class folder(s); a classifier needs at least 2")
        classes[split] = {c.name: [f for f in c.iterdir() if f.suffix.lower() in _IMAGE_SUFFIXES] for c in folders}
        if not any(classes[split].values()):
            raise DataError(f"{split} has class folders but no images")
    if evaluation is not None:
        unknown = sorted(set(classes[evaluation]) - set(classes[train]))
        if unknown:
            raise DataError(f"{evaluation} has class folder(s) that {train} lacks ({', '.join(unknown[:3])}); "
                            "a model cannot learn a class it never sees")
    _verify_images([f for by_class in classes.values() for files in by_class.values() for f in files])
    return train, evaluation


def _data_hint(name: str) -> str:
    """"; did you mean --data X?" for a missing data folder whose name is close to fashion-mnist, or is a data set
    that timm names torch/NAME (cifar10, CIFAR-100, mnist, ...); else ""."""
    key = name.lower().replace("_", "-")
    near = difflib.get_close_matches(key, [FASHION_MNIST], n=1, cutoff=0.8)
    if near:
        return f"; did you mean --data {near[0]}?" if name != near[0] else ""
    # Only the same name in another spelling: a near miss of a short name is often another data set (emnist, qmnist).
    torch_name = {n.replace("_", ""): n for n in _TORCH_DATASETS}.get(key.replace("-", ""))
    if torch_name:
        return f"; did you mean --data torch/{torch_name} (with --data-dir, the folder that holds its files)?"
    return ""


def _verify_images(files) -> None:
    """Stop before training starts (and before anything is written) if an image cannot be read.

    Large data sets are not scanned up front; an unreadable image there stops the run when it is reached.
    """
    if len(files) > _VERIFY_LIMIT:
        return
    for f in files:
        try:
            with Image.open(f) as im:
                im.verify()
        except Exception:  # PIL raises many types (UnidentifiedImageError, SyntaxError, struct.error, ...)
            raise DataError(f"cannot read image {f}; remove or replace it") from None


def _folder_dataset(split: Path, **kwargs):
    try:
        return create_dataset("", root=str(split), search_split=False, **kwargs)
    except Exception as e:  # timm raises plain errors for unreadable folders
        raise DataError(f"cannot read {split} as an image folder ({str(e)[:120]})") from None


def _fashion_mnist_splits(root: Path, data_dir: str | None) -> tuple:
    """Fashion-MNIST's training and test splits read by torchvision from `root`; a truncated or damaged idx file
    gives a DataError naming the folder it came from."""
    try:
        return tuple(create_dataset("torch/fashion_mnist", root=str(root), split=split, download=False)
                     for split in ("train", "validation"))
    except (RuntimeError, ValueError, OSError) as e:  # torchvision's parser fails on a bad shape or header
        raise DataError(f"cannot read the Fashion-MNIST idx files from {data_dir or DEBIAN_FASHION_MNIST} "
                        f"({' '.join(str(e).split())[:120]}); replace the damaged file") from None


def _raw_splits(spec: DataSpec):
    """The training and evaluation splits as timm datasets of (PIL image, label); evaluation is None for an image
    folder without val/, validation/ or test/."""
    if spec.name == FASHION_MNIST:
        return _fashion_mnist_splits(_fashion_mnist_root(Path(spec.data_dir) if spec.data_dir else None),
                                     spec.data_dir)
    if spec.name.split("/", 1)[0] not in _TIMM_PREFIXES:
        train_dir, eval_dir = _folder_splits(Path(spec.name))
        train = _folder_dataset(train_dir)
        # The training folder's class indices, so that an evaluation folder missing a class keeps the same labels.
        return train, _folder_dataset(eval_dir, class_map=train.reader.class_to_idx) if eval_dir is not None else None
    try:
        return tuple(create_dataset(spec.name, root=spec.data_dir, split=split, download=False)
                     for split in ("train", "validation"))
    except Exception as e:  # timm's dataset back-ends raise their own error types
        if not spec.data_dir:  # some back-ends find their own cache; the others need the folder
            raise DataError(f"timm dataset {spec.name!r} needs --data-dir, the folder that holds its files (nothing "
                            f"is downloaded; {str(e)[:120]})") from None
        raise DataError(f"timm cannot open dataset {spec.name!r} in {spec.data_dir} ({str(e)[:120]})") from None


def _stats(spec: DataSpec):
    if spec.name == FASHION_MNIST and spec.in_chans == 1:
        return _FMNIST_STATS
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    if spec.name == FASHION_MNIST:
        return _FMNIST_STATS[0] * spec.in_chans, _FMNIST_STATS[1] * spec.in_chans
    if spec.in_chans == 1:
        return (sum(mean) / 3,), (sum(std) / 3,)
    return mean, std


def transform(spec: DataSpec, train: bool):
    """timm's transform for the spec: light augmentation for training, resize + centre crop for evaluation."""
    mean, std = _stats(spec)
    size = (spec.in_chans, spec.img_size, spec.img_size)
    if train:
        return create_transform(size, is_training=True, scale=(0.8, 1.0), ratio=(0.9, 1.1), hflip=0.5,
                                color_jitter=0.0, mean=mean, std=std)
    return create_transform(size, is_training=False, crop_pct=1.0, mean=mean, std=std)


class HeldOut(Subset):
    """Evaluation images held out from the training images of a folder that has no val/, validation/ or test/."""


class FirstImages(Subset):
    """The first images of an evaluation split (`eval_subset`): the same images for every run."""


class Splits(NamedTuple):
    """The three disjoint splits of a data set."""
    train: Subset
    calib: Subset
    evaluation: "_Images | HeldOut | FirstImages"

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "calib": len(self.calib), "eval": len(self.evaluation)}

    def describe(self) -> str:
        """One line: the size of each split, and where the evaluation images come from when held out or cut."""
        n, ev = self.sizes(), self.evaluation
        whole = cast("_Images | HeldOut", ev.dataset) if isinstance(ev, FirstImages) else ev
        first = f" (the first {len(ev):,} of {len(whole):,})" if ev is not whole else ""
        held = (" (evaluation images held out from train/: the folder has no val/, validation/ or test/)"
                if isinstance(whole, HeldOut) else "")
        return (f"data: {n['train']:,} training, {n['calib']:,} calibration and {n['eval']:,} evaluation "
                f"images{first}{held}")


def split_size(n: int) -> int:
    """The default size of a split carved from n images: 10%, at least 100 and at most 2,000, at most a quarter."""
    return max(1, min(max(round(n / 10), 100), 2000, n // 4))


def _held_out(n: int) -> tuple[list[int], list[int]]:
    """(evaluation, rest) indices of n training images; the same for every run, whatever its seed."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(_HELD_OUT_SEED)).tolist()
    k = split_size(n)
    return sorted(order[:k]), sorted(order[k:])


def _mode(spec: DataSpec) -> str:
    return "L" if spec.in_chans == 1 else "RGB"


def _evaluation(spec: DataSpec, raw_train, raw_eval) -> tuple["_Images | HeldOut", list[int]]:
    """The evaluation split and the indices of the training images it leaves for training and calibration."""
    if raw_eval is not None:
        return _Images(raw_eval, _mode(spec), transform(spec, False)), list(range(len(raw_train)))
    held, rest = _held_out(len(raw_train))
    return HeldOut(_Images(raw_train, _mode(spec), transform(spec, False)), held), rest


def datasets(spec: DataSpec, calib_size: int | None = None, train_subset: int = 0, seed: int = 0,
             eval_subset: int = 0) -> Splits:
    """(train, calibration, evaluation) datasets, disjoint; calibration is carved from the training images with
    `seed`, evaluation is the data set's own split or, for a folder without one, held out from train/.

    Args:
        calib_size: calibration images; None: `split_size` of the training images.
        train_subset: if > 0, use only this many training images (a random subset, for quick runs).
        eval_subset: if > 0, evaluate only the first this many images of the evaluation split (the same images for
            every run, so quick runs stay comparable).

    Raises:
        DataError: missing or malformed data, or too few training images for the calibration split.
    """
    raw_train, raw_eval = _raw_splits(spec)
    evaluation, pool = _evaluation(spec, raw_train, raw_eval)
    size = calib_size or split_size(len(pool))
    if len(pool) <= size:
        raise DataError(f"the training split has {len(pool)} images, not more than calib_size={size}; lower "
                        "calib_size or leave it unset (10% of the training split)")
    order = [pool[i] for i in torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)).tolist()]
    calib_idx, train_idx = order[:size], order[size:]
    if train_subset:
        train_idx = train_idx[:train_subset]
    train = Subset(_Images(raw_train, _mode(spec), transform(spec, True)), train_idx)
    calib = Subset(_Images(raw_train, _mode(spec), transform(spec, False)), calib_idx)
    return Splits(train, calib, first_images(evaluation, eval_subset))


def first_images(evaluation: "_Images | HeldOut", n: int) -> "_Images | HeldOut | FirstImages":
    """The first n images of an evaluation split (all of it when n is 0 or at least its size): the same images for
    every run and every command, so quick runs stay comparable."""
    return FirstImages(evaluation, range(n)) if 0 < n < len(evaluation) else evaluation


def eval_dataset(spec: DataSpec) -> "_Images | HeldOut":
    """The evaluation split alone (the same images as `datasets` gives)."""
    return _evaluation(spec, *_raw_splits(spec))[0]


def num_classes(ds: Dataset) -> int:
    """Number of classes of a dataset made here."""
    while isinstance(ds, Subset):
        ds = ds.dataset
    inner = ds.ds if isinstance(ds, _Images) else ds
    for attr in ("classes",):
        if hasattr(inner, attr):
            return len(getattr(inner, attr))
    reader = getattr(inner, "reader", None)
    if reader is not None and hasattr(reader, "class_to_idx"):
        return len(reader.class_to_idx)
    raise DataError("cannot tell the number of classes of this data set")


class EpochSampler(Sampler):
    """Indices in a seeded per-epoch order, sharded across processes, starting at a given position.

    The order depends only on (seed, epoch), so a resumed run sees exactly the batches it would have seen.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1):
        self.size, self.seed, self.rank, self.world = size, seed, rank, world
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _indices(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
        per_rank = self.size // self.world
        return order[self.rank * per_rank:(self.rank + 1) * per_rank].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start:])

    def __len__(self) -> int:
        return self.size // self.world - self.start


def loader(ds: Dataset, batch_size: int, sampler: Sampler | None = None, workers: int = 0) -> DataLoader:
    """A CPU data loader; training loaders take an EpochSampler, evaluation loaders keep the data set's order."""
    # A private generator: creating the iterator must not draw from the global RNG, or a resumed run would diverge.
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=workers,
                      drop_last=sampler is not None, persistent_workers=workers > 0,
                      generator=torch.Generator().manual_seed(0))
