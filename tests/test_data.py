"""IDX parsing on the real files and on malformed ones; the stratified split."""

from __future__ import annotations

import gzip
import io
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.transforms import functional as TF

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
    images = official[1].images[:8]
    x = to_input(images)
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32
    for i in range(8):  # torchvision's ToTensor, as the reference's loader applied it
        assert torch.equal(x[i], TF.to_tensor(images[i].numpy()))


MAGIC = "(expected 0x00000803: unsigned bytes, 3 dimensions"
# Each malformed file and the whole problem its refusal states after the file's name.
MALFORMED = [
    ("bad magic", idx(3, (3, 28, 28), bytes(3 * 784))[:2] + b"\x09\x03" + bytes(12 + 3 * 784),
     f"bad magic number 0x00000903 {MAGIC})"),
    ("wrong dimensions", idx(2, (3, 784), bytes(3 * 784)), f"bad magic number 0x00000802 {MAGIC})"),
    ("truncated header", b"\x00\x00\x08", "truncated: 3 bytes, shorter than the IDX header"),
    ("truncated data", idx(3, (3, 28, 28), bytes(3 * 784 - 1)),
     f"truncated: {16 + 3 * 784 - 1} bytes, but its header (3, 28, 28) says {16 + 3 * 784}"),
    ("trailing bytes", idx(3, (3, 28, 28), bytes(3 * 784 + 5)),
     f"has trailing bytes: {16 + 3 * 784 + 5} bytes, but its header (3, 28, 28) says "
     f"{16 + 3 * 784}"),
    ("not 28x28", idx(3, (2, 32, 32), bytes(2 * 1024)), "images are 32x32, expected 28x28"),
    ("empty", idx(3, (0, 28, 28), b""), "holds no images"),
    ("empty file", b"", "truncated: 0 bytes, shorter than the IDX header"),
    ("gzip-compressed", gzip.compress(idx(3, (3, 28, 28), bytes(3 * 784))),
     f"bad magic number 0x1f8b0800 {MAGIC}; gzip-compressed? data/raw holds the uncompressed "
     "files)"),
    # 2**96 bytes claimed: sizes are computed without int64 overflow.
    ("absurd header", idx(3, (2**32 - 1, 2**32 - 1, 2**32 - 1), bytes(784)),
     f"truncated: {16 + 784} bytes, but its header ({2**32 - 1}, {2**32 - 1}, {2**32 - 1}) says "
     f"{16 + (2**32 - 1) ** 3}"),
]


@pytest.mark.parametrize(("case", "content", "problem"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_image_files_are_refused_naming_the_file(tmp_path, case, content, problem):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"^{re.escape(f'{path}: {problem}')}$"):
        read_images(path)


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
    pixels = np.arange(3 * 28 * 28, dtype=np.uint8)  # 0..255 over and over, row-major
    (tmp_path / "images").write_bytes(idx(3, (3, 28, 28), pixels.tobytes()))
    (tmp_path / "labels").write_bytes(labels_file([1, 2, 9]))
    pair = load_idx_pair(tmp_path / "images", tmp_path / "labels")
    assert pair.labels.tolist() == [1, 2, 9] and pair.labels.dtype == torch.int64
    assert pair.images.dtype == torch.uint8
    assert np.array_equal(pair.images.numpy(), pixels.reshape(3, 28, 28))


def test_split_is_stratified_disjoint_and_deterministic(official):
    labels = official[0].labels.numpy()
    cfg = SplitConfig(val_size=6000, limit=0, seed=42)
    train_idx, val_idx = stratified_split(labels, cfg)
    assert len(train_idx) == 54_000 and len(val_idx) == 6000
    assert np.array_equal(np.sort(np.concatenate([train_idx, val_idx])), np.arange(60_000))
    assert (np.diff(train_idx) > 0).all() and (np.diff(val_idx) > 0).all()  # sorted
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


INVALID = re.escape("not a valid prepared split (")  # then numpy's or zipfile's words
# Each bad split and the problem its refusal states after the file's name: whole (ending in $)
# where the words are ours.
BAD_SPLITS = [
    ("not a zip", b"not a zip", INVALID + "ValueError: "),  # np.load takes it for a pickle
    ("truncated", GOOD[: len(GOOD) // 2],
     INVALID + re.escape("BadZipFile: File is not a zip file)") + "$"),
    ("flipped byte", flip_in_images(GOOD),
     INVALID + re.escape("BadZipFile: Bad CRC-32 for file 'images.npy')") + "$"),
    ("no labels", npz(images=IMAGES), INVALID + "KeyError: 'labels "),
    ("pickled objects", npz(images=np.array([object()] * 4), labels=LABELS),
     INVALID + "ValueError: Object arrays cannot be loaded when allow_pickle=False"),
    ("float images", npz(images=IMAGES.astype(np.float32), labels=LABELS),
     re.escape("images must be (N, 28, 28) uint8, got float32 (4, 28, 28)") + "$"),
    ("wrong image size", npz(images=np.zeros((4, 32, 32), np.uint8), labels=LABELS),
     re.escape("images must be (N, 28, 28) uint8, got uint8 (4, 32, 32)") + "$"),
    ("empty", npz(images=IMAGES[:0], labels=LABELS[:0]), "holds no images$"),
    ("too few labels", npz(images=IMAGES, labels=LABELS[:3]),
     re.escape("labels must be (4,) uint8 to match the images, got uint8 (3,)") + "$"),
    ("label out of range", npz(images=IMAGES, labels=np.array([0, 3, 10, 1], np.uint8)),
     re.escape("label 10 is outside 0..9") + "$"),
]


@pytest.mark.parametrize(("case", "content", "problem"), BAD_SPLITS,
                         ids=[b[0] for b in BAD_SPLITS])
def test_bad_prepared_splits_are_refused_naming_the_file(tmp_path, case, content, problem):
    path = tmp_path / "train.npz"
    path.write_bytes(content)
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: {problem}") as error:
        load_split(path)
    assert "\n" not in str(error.value)


def test_missing_prepared_split(tmp_path):
    with pytest.raises(DataError, match="run `fashionnet split`"):
        load_split(tmp_path / "missing.npz")
