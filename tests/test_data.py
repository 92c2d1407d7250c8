"""IDX parsing on the real files and on malformed ones; the stratified split."""

from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fashionnet.data import load_split, save_split, to_input
from fashionnet.errors import ConfigError, DataError
from fashionnet.idx import load_idx_pair, read_images, read_labels
from fashionnet.split import SplitConfig, stratified_split


def idx(magic_dims: int, dims: tuple[int, ...], payload: bytes, type_code: int = 8) -> bytes:
    return bytes([0, 0, type_code, magic_dims]) + struct.pack(f">{len(dims)}I", *dims) + payload


def images_file(n: int = 3, size: int = 28) -> bytes:
    return idx(3, (n, size, size), bytes(n * size * size))


def labels_file(labels: list[int]) -> bytes:
    return idx(1, (len(labels),), bytes(labels))


def test_real_files(official):
    train, test = official
    assert train.images.shape == (60_000, 28, 28) and test.images.shape == (10_000, 28, 28)
    assert train.images.dtype == torch.uint8
    # Fashion-MNIST is balanced: 6,000 and 1,000 images per class.
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10


def test_to_input_scales_like_to_tensor(official):
    x = to_input(official[1].images[:8])
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32
    assert x.min() >= 0 and x.max() <= 1
    assert torch.allclose(x[:, 0] * 255, official[1].images[:8].float())


MALFORMED = [
    ("bad magic", idx(3, (3, 28, 28), bytes(3 * 784))[:2] + b"\x09\x03" + bytes(12 + 3 * 784),
     "bad magic number"),
    ("wrong dimensions", idx(2, (3, 784), bytes(3 * 784)), "bad magic number"),
    ("truncated header", b"\x00\x00\x08", "shorter than the IDX header"),
    ("truncated data", idx(3, (3, 28, 28), bytes(3 * 784 - 1)), "truncated"),
    ("trailing bytes", idx(3, (3, 28, 28), bytes(3 * 784 + 5)), "trailing bytes"),
    ("not 28x28", idx(3, (2, 32, 32), bytes(2 * 1024)), "expected 28x28"),
    ("empty", idx(3, (0, 28, 28), b""), "no images"),
    ("empty file", b"", "shorter than the IDX header"),
    ("gzip-compressed", gzip.compress(idx(3, (3, 28, 28), bytes(3 * 784))), "gzip-compressed"),
    # 2**96 bytes claimed: sizes are computed without int64 overflow.
    ("absurd header", idx(3, (2**32 - 1, 2**32 - 1, 2**32 - 1), bytes(784)), "truncated"),
]


@pytest.mark.parametrize(("case", "content", "message"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_image_files_are_refused_naming_the_file(tmp_path, case, content, message):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as error:
        read_images(path)
    assert str(path) in str(error.value)


def test_label_out_of_range(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(labels_file([0, 9, 10, 3]))
    with pytest.raises(DataError, match=r"label 10 at index 2 is outside 0\.\.9"):
        read_labels(path)


def test_images_and_labels_that_do_not_belong_together(tmp_path):
    (tmp_path / "images").write_bytes(images_file(3))
    (tmp_path / "labels").write_bytes(labels_file([1, 2]))
    with pytest.raises(DataError, match="2 labels do not match the 3 images"):
        load_idx_pair(tmp_path / "images", tmp_path / "labels")
    (tmp_path / "labels").write_bytes(images_file(3))  # an image file where labels belong
    with pytest.raises(DataError, match="bad magic number"):
        load_idx_pair(tmp_path / "images", tmp_path / "labels")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        read_labels(tmp_path / "nothing")


def test_small_valid_pair(tmp_path):
    (tmp_path / "images").write_bytes(images_file(3))
    (tmp_path / "labels").write_bytes(labels_file([1, 2, 9]))
    pair = load_idx_pair(tmp_path / "images", tmp_path / "labels")
    assert pair.labels.tolist() == [1, 2, 9] and pair.images.shape == (3, 28, 28)


def test_split_is_stratified_disjoint_and_deterministic(official):
    labels = official[0].labels.numpy()
    cfg = SplitConfig(val_size=6000, limit=0, seed=42)
    train_idx, val_idx = stratified_split(labels, cfg)
    assert len(train_idx) == 54_000 and len(val_idx) == 6000
    assert not set(train_idx) & set(val_idx)
    assert np.bincount(labels[val_idx]).tolist() == [600] * 10
    again = stratified_split(labels, cfg)
    assert np.array_equal(again[0], train_idx) and np.array_equal(again[1], val_idx)
    other = stratified_split(labels, SplitConfig(val_size=6000, seed=7))
    assert not np.array_equal(other[1], val_idx)


def test_limit_is_a_stratified_subset_of_the_training_split(official):
    labels = official[0].labels.numpy()
    full_train, val = stratified_split(labels, SplitConfig(val_size=6000))
    train_idx, val_idx = stratified_split(labels, SplitConfig(val_size=6000, limit=3000))
    assert np.array_equal(val_idx, val)  # the limit never changes the validation set
    assert len(train_idx) == 3000 and set(train_idx) <= set(full_train)
    assert np.bincount(labels[train_idx]).tolist() == [300] * 10


@pytest.mark.parametrize(("cfg", "key"), [
    (SplitConfig(val_size=1000), "split.val_size"),
    (SplitConfig(val_size=100, limit=901), "split.limit"),
])
def test_split_sizes_that_do_not_fit_the_labels_given(official, cfg, key):
    # params.yaml's schema checks the sizes against the official 60,000 images; the split
    # itself checks them against the labels it is given.
    with pytest.raises(ConfigError, match=key):
        stratified_split(official[0].labels.numpy()[:1000], cfg)


def test_prepared_split_round_trip(tmp_path: Path, official):
    data = official[1].subset(np.arange(50))
    save_split(tmp_path / "test.npz", data, np.arange(50))
    back = load_split(tmp_path / "test.npz")
    assert torch.equal(back.images, data.images) and torch.equal(back.labels, data.labels)


def npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


IMAGES, LABELS = np.zeros((4, 28, 28), np.uint8), np.array([0, 3, 9, 1], np.uint8)
GOOD = npz(images=IMAGES, labels=LABELS, index=np.arange(4))


def flip_in_images(raw: bytes) -> bytes:
    at = raw.index(IMAGES.tobytes()[:64]) + 100
    return raw[:at] + b"\x01" + raw[at + 1 :]


BAD_SPLITS = [
    ("not a zip", b"not a zip", "not a valid prepared split"),
    ("truncated", GOOD[: len(GOOD) // 2], "not a valid prepared split"),
    ("flipped byte", flip_in_images(GOOD), "not a valid prepared split"),
    ("no labels", npz(images=IMAGES), "not a valid prepared split"),
    ("pickled objects", npz(images=np.array([object()] * 4), labels=LABELS),
     "not a valid prepared split"),
    ("float images", npz(images=IMAGES.astype(np.float32), labels=LABELS), "uint8"),
    ("wrong image size", npz(images=np.zeros((4, 32, 32), np.uint8), labels=LABELS),
     r"\(N, 28, 28\)"),
    ("empty", npz(images=IMAGES[:0], labels=LABELS[:0]), "holds no images"),
    ("too few labels", npz(images=IMAGES, labels=LABELS[:3]), r"labels must be \(4,\) uint8"),
    ("label out of range", npz(images=IMAGES, labels=np.array([0, 3, 10, 1], np.uint8)),
     r"label 10 is outside 0\.\.9"),
]


@pytest.mark.parametrize(("case", "content", "message"), BAD_SPLITS,
                         ids=[b[0] for b in BAD_SPLITS])
def test_bad_prepared_splits_are_refused_naming_the_file(tmp_path, case, content, message):
    path = tmp_path / "train.npz"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as error:
        load_split(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_missing_prepared_split(tmp_path):
    with pytest.raises(DataError, match="run `fashionnet split`"):
        load_split(tmp_path / "missing.npz")
