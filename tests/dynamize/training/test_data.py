"""Data splits: training, calibration and evaluation are disjoint; an image folder is never evaluated on its training
images; default split sizes follow the size of the training split."""
import gzip
import math
import struct

import pytest
import torch
from helpers import make_image_folder

from dynamize.training.data import DataError, DataSpec, HeldOut, datasets, eval_dataset, num_classes, split_size


def _files(ds) -> set[str]:
    """The image files behind a split (Subsets of the wrapped timm dataset, or the wrapped dataset itself)."""
    indices = ds.indices if hasattr(ds, "indices") else range(len(ds))
    inner = ds.dataset if hasattr(ds, "indices") else ds
    return {str(inner.ds.filename(i, absolute=True)) for i in indices}


def _spec(root):
    return DataSpec(str(root), None, 32, 3)


def test_folder_without_eval_split_holds_out_training_images(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=20, splits=("train",))
    train, calib, evaluation = datasets(_spec(root), calib_size=5)
    assert isinstance(evaluation, HeldOut)
    files = [_files(s) for s in (train, calib, evaluation)]
    assert len(files[1]) == 5 and len(files[2]) == split_size(60) == 15
    assert not files[0] & files[1] and not files[0] & files[2] and not files[1] & files[2]
    assert len(files[0] | files[1] | files[2]) == 60
    # The same held-out images whatever the seed, and for the report too.
    assert _files(datasets(_spec(root), calib_size=5, seed=7).evaluation) == files[2]
    assert _files(eval_dataset(_spec(root))) == files[2]
    assert "held out from train/" in datasets(_spec(root), calib_size=5).describe()


@pytest.mark.parametrize("splits, used", [(("train", "test"), "test"), (("train", "val", "test"), "val"),
                                          (("train", "validation"), "validation")])
def test_folder_with_eval_split_uses_it_alone(tmp_path, splits, used):
    root = make_image_folder(tmp_path / "d", per_class=4, splits=splits)
    evaluation = eval_dataset(_spec(root))
    assert not isinstance(evaluation, HeldOut)
    assert {f.split("/")[-3] for f in _files(evaluation)} == {used}
    assert len(evaluation) == 12
    train, calib, _ = datasets(_spec(root), calib_size=2)
    assert {f.split("/")[-3] for f in _files(train) | _files(calib)} == {"train"}


def test_eval_folder_missing_a_class_keeps_the_training_labels(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=3, per_class=4)
    for f in (root / "val" / "class1").iterdir():
        f.unlink()
    (root / "val" / "class1").rmdir()
    evaluation = eval_dataset(_spec(root))
    labels = {evaluation[i][1] for i in range(len(evaluation))}
    assert labels == {0, 2} and num_classes(evaluation) == 3


def test_eval_class_unknown_to_training_is_refused(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=3, per_class=2)
    (root / "val" / "class2").rename(root / "val" / "other")
    with pytest.raises(DataError, match="other"):
        datasets(_spec(root))


@pytest.mark.parametrize("n, size", [(1437, 144), (600, 100), (60_000, 2000), (200, 50), (36, 9), (3, 1)])
def test_default_split_size(n, size):
    assert split_size(n) == size


def test_default_calibration_split_fits_a_small_folder(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=20)  # 60 training images: below the 2,000 of old
    splits = datasets(_spec(root))
    assert splits.sizes() == {"train": 45, "calib": 15, "eval": 60}
    assert splits.describe() == "data: 45 training, 15 calibration and 60 evaluation images"


def test_calibration_larger_than_the_training_split_names_the_fix(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=2)
    with pytest.raises(DataError, match="leave it unset"):
        datasets(_spec(root), calib_size=100)


def test_an_evaluation_subset_is_the_first_images_and_is_reported_as_such(tmp_path):
    root = make_image_folder(tmp_path / "d", per_class=20)
    whole = datasets(_spec(root)).evaluation
    cut = datasets(_spec(root), eval_subset=25)
    assert cut.sizes()["eval"] == 25
    assert all(torch.equal(cut.evaluation[i][0], whole[i][0]) for i in range(25))  # the same images, in order
    assert not torch.equal(cut.evaluation[0][0], whole[1][0])
    assert cut.describe() == "data: 45 training, 15 calibration and 25 evaluation images (the first 25 of 60)"
    assert "first" not in datasets(_spec(root), eval_subset=60).describe()  # all of them: nothing was cut
    held = datasets(_spec(make_image_folder(tmp_path / "h", per_class=20, splits=("train",))), eval_subset=10)
    assert len(held.evaluation) == 10
    assert "(the first 10 of 15) (evaluation images held out from train/" in held.describe()


@pytest.mark.parametrize("name, hint", [
    ("cifar10", "did you mean --data torch/cifar10 (with --data-dir"),
    ("CIFAR-100", "did you mean --data torch/cifar100 (with --data-dir"),
    ("mnist", "did you mean --data torch/mnist (with --data-dir"),
    ("fashion_mnist", "did you mean --data fashion-mnist?"),
    ("emnist", None),  # not a near miss of mnist: timm has no torch/emnist
])
def test_a_missing_folder_named_as_a_known_data_set_suggests_its_name(tmp_path, monkeypatch, name, hint):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as e:
        eval_dataset(DataSpec(name, None, 32, 3))
    message = str(e.value)
    assert message.startswith(f"data folder {name} does not exist")
    assert (hint in message) if hint else "did you mean" not in message


def _fake_fashion_mnist(folder, label: int, n: int = 8, gz: bool = False):
    """The four Fashion-MNIST idx files (magic, big-endian sizes, bytes) with n images per split, every image and
    label equal to `label`, so that the images read tell which files they came from."""
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "t10k"):
        for kind, dims in (("images-idx3", (n, 28, 28)), ("labels-idx1", (n,))):
            body = struct.pack(f">I{len(dims)}I", 0x800 + len(dims), *dims) + bytes([label]) * math.prod(dims)
            name = f"{split}-{kind}-ubyte"
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(body))
            else:
                (folder / name).write_bytes(body)
    return folder


def _fashion_mnist_labels(data_dir) -> set[int]:
    evaluation = datasets(DataSpec("fashion-mnist", str(data_dir), 28, 1), calib_size=2).evaluation
    return {evaluation[i][1] for i in range(len(evaluation))}


def test_fashion_mnist_reads_the_files_of_the_data_dir_given_not_a_cached_copy_of_others(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNAMIZE_CACHE", str(tmp_path / "cache"))
    assert _fashion_mnist_labels(_fake_fashion_mnist(tmp_path / "a", label=1)) == {1}
    assert _fashion_mnist_labels(_fake_fashion_mnist(tmp_path / "b", label=7, gz=True)) == {7}
    changed = _fake_fashion_mnist(tmp_path / "a", label=3, n=9)  # the same folder, its files replaced
    assert _fashion_mnist_labels(changed) == {3}


def test_a_torchvision_fashion_mnist_root_is_read_in_place(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNAMIZE_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "tv"
    _fake_fashion_mnist(root / "FashionMNIST" / "raw", label=5)
    assert _fashion_mnist_labels(root) == {5}
    assert not (tmp_path / "cache").exists()


def test_a_truncated_fashion_mnist_file_is_one_error_naming_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNAMIZE_CACHE", str(tmp_path / "cache"))
    source = _fake_fashion_mnist(tmp_path / "a", label=1)
    images = source / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:100])  # the header says 8 images; fewer bytes follow
    with pytest.raises(DataError, match=f"cannot read the Fashion-MNIST idx files from {source}.*replace"):
        _fashion_mnist_labels(source)
