"""Inputs that must never hang `fashionnet predict` or exhaust its memory: named pipes, sockets
and devices, directory walks with loops or unreadable entries, .npz and IDX headers that claim
more than the file holds, images over the pixel limit, and a great many images."""

from __future__ import annotations

import io
import os
import socket
import struct
import threading
import tracemalloc
import warnings
import zipfile

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipeline.cli import main
from tests.helpers import peak_growth
from tests.predict_helpers import assert_bad_input, blank_png

MB = 1 << 20


def test_a_named_pipe_is_refused_without_blocking(capsys, tmp_path, model_file):
    """Opening a FIFO for reading waits for a writer: the command must not open it."""
    fifo = tmp_path / "photo.png"
    os.mkfifo(fifo)
    result: dict[str, int] = {}
    thread = threading.Thread(daemon=True, target=lambda: result.update(
        status=main(["predict", str(fifo), "--model", str(model_file)])))
    thread.start()
    thread.join(timeout=60)  # a deadline, not a wait: it ends at once unless it blocks
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY))  # let the blocked open through, then fail
        thread.join()
        pytest.fail("fashionnet predict blocked opening a named pipe")
    assert_bad_input(result["status"], capsys.readouterr().err, fifo, "a named pipe (FIFO)")


@pytest.mark.parametrize(("kind", "what"), [("socket", "a socket"),
                                           ("device", "a character device")])
def test_sockets_and_devices_are_refused_naming_the_path(cli, tmp_path, model_file, kind, what):
    path = tmp_path / "photo.png"
    if kind == "socket":
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(path))
    else:
        path = "/dev/zero"  # endless
    status, out, err = cli(tmp_path, "predict", path, "--model", model_file)
    assert_bad_input(status, err, path, f"not a regular file: {what}")
    assert out == ""


def test_walks_meeting_loops_or_special_files_exit_2_or_skip_them(cli, tmp_path, model_file):
    """A link back to a parent directory, a link to itself, a FIFO named like an image: each
    is an error naming it (it was an OSError, exit 1, or the FIFO went unnoticed), and with
    --skip-bad each is reported and the images beside it predicted."""
    cases = {"loop": ("sub/up", "a symbolic link loop"),
             "self": ("self.png", "Too many levels of symbolic links"),
             "fifo": ("pipe.png", "not a regular file: a named pipe (FIFO)")}
    for name, (entry, problem) in cases.items():
        directory = tmp_path / name
        (directory / "sub").mkdir(parents=True)
        Image.fromarray(np.zeros((28, 28), np.uint8)).save(directory / "a.png")
        if name == "loop":
            (directory / "sub" / "up").symlink_to("..")
        elif name == "self":
            (directory / "self.png").symlink_to("self.png")
        else:
            os.mkfifo(directory / "pipe.png")
        status, out, err = cli(tmp_path, "predict", directory, "--model", model_file)
        assert_bad_input(status, err, directory / entry, problem)
        status, out, err = cli(tmp_path, "predict", directory, "--model", model_file, "--skip-bad")
        assert status == 0 and err == f"fashionnet predict: skipped {directory / entry}: " \
                                      f"{err.split(': ', 2)[2]}" and problem in err
        assert [line.split(",")[0] for line in out.splitlines()[1:]] == [
            str(directory / "a.png")]


def test_an_npz_claiming_a_billion_images_exits_2_at_once(cli, tmp_path, model_file):
    """Its header says 784 GB, the file holds 2 kB: refused from the header (numpy used to
    try to allocate the 784 GB: MemoryError, exit 1)."""
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        member, {"descr": "|u1", "fortran_order": False, "shape": (10**9, 28, 28)})
    path = tmp_path / "forged.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("images.npy", member.getvalue() + bytes(3 * 784))
    status, out, err = cli(tmp_path, "predict", path, "--model", model_file)
    assert_bad_input(status, err, path, "'images' claims (1000000000, 28, 28)")
    assert out == ""


def test_an_idx_file_claiming_more_than_it_holds_is_refused_unread(cli, tmp_path, model_file):
    """200 MB (sparse) with a header claiming 4 billion images: refused from its size, no
    byte of its data read (it used to be read whole first)."""
    path = tmp_path / "forged-idx3-ubyte"
    with open(path, "wb") as f:
        f.write(b"\x00\x00\x08\x03" + struct.pack(">III", 2**32 - 1, 28, 28))
        f.truncate(200 * MB)
    tracemalloc.start()
    try:
        status, out, err = cli(tmp_path, "predict", path, "--model", model_file)
        peak = tracemalloc.get_traced_memory()[1]  # what Python and NumPy allocated
    finally:
        tracemalloc.stop()
    assert_bad_input(status, err, path, f"truncated: {200 * MB} bytes, but its header")
    assert peak < 10 * MB and out == ""


def test_an_image_over_the_pixel_limit_is_refused_before_decoding(cli, tmp_path, model_file):
    """4097x4096 pixels, one row over MAX_PIXELS (it used to be decoded, whatever its size
    up to Pillow's 179 million), and 9500x9500 without Pillow's warning on stderr beside the
    one line; a JPEG over the limit is decoded at half scale and read."""
    path = tmp_path / "big.png"
    path.write_bytes(blank_png(4097, 4096))
    status, out, err = cli(tmp_path, "predict", path, "--model", model_file)
    assert_bad_input(status, err, path, "4097x4096 pixels to decode, more than the limit of "
                                        "16,777,216")
    path.write_bytes(blank_png(9500, 9500))  # over Pillow's 89.5 million: it would warn
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status, out, err = cli(tmp_path, "predict", path, "--model", model_file)
    assert_bad_input(status, err, path, "9500x9500 pixels to decode")
    assert not [w for w in caught if w.category is Image.DecompressionBombWarning]
    photo = Image.new("RGB", (4200, 4200), (250, 250, 250))
    ImageDraw.Draw(photo).ellipse((1000, 1000, 3000, 3500), fill=(30, 30, 30))
    photo.save(tmp_path / "big.jpg", quality=70)
    status, out, err = cli(tmp_path, "predict", tmp_path / "big.jpg", "--model", model_file)
    assert status == 0 and out.count("\n") == 2, err


@pytest.mark.slow
def test_a_photo_at_the_pixel_limit_costs_under_100_mb(tmp_path, model_file):
    """A 4096x4096 RGB PNG: Pillow holds it at 4 bytes a pixel (64 MB), its greyscale adds
    16 MB; nothing else of that size. Peak memory of a process predicting it, after a first
    prediction (the model's own buffers), measured by the kernel. (It was 0.5 GB.)"""
    photo = Image.new("RGB", (4096, 4096), (250, 248, 245))
    ImageDraw.Draw(photo).ellipse((500, 300, 3500, 3900), fill=(120, 30, 40))
    photo.save(tmp_path / "photo.png", compress_level=1)
    Image.new("RGB", (300, 200), "white").save(tmp_path / "small.png")
    predict = f"main(['predict', '{{}}', '--model', '{model_file}'])"
    growth, out = peak_growth(
        "from pipeline.cli import main\n" + predict.format(tmp_path / "small.png"),
        predict.format(tmp_path / "photo.png"))
    assert out.count(str(tmp_path / "photo.png")) == 1
    assert growth < 100 * MB, f"{growth / MB:.0f} MB"


@pytest.mark.slow
def test_predicting_300000_images_needs_no_more_memory_than_a_few(tmp_path, model_file):
    """300,000 images in one .npz (235 MB): the command streams them in chunks, so its peak
    memory stays that of the model and a few chunks (it held every image twice and every
    row's dict: 1 GB more, measured the same way)."""
    np.savez(tmp_path / "many.npz", images=np.zeros((300_000, 28, 28), np.uint8))
    np.savez(tmp_path / "few.npz", images=np.zeros((10, 28, 28), np.uint8))
    predict = (f"import os\nsys.stdout = open(os.devnull, 'w')\n"
               f"assert main(['predict', '{{}}', '--model', '{model_file}']) == 0")
    growth, _ = peak_growth(
        "from pipeline.cli import main\n" + predict.format(tmp_path / "few.npz"),
        predict.format(tmp_path / "many.npz"), timeout=600)
    assert growth < 600 * MB, f"{growth / MB:.0f} MB"
