"""`fashionnet predict`: classes and probabilities for users' own image files.

Not a DVC stage (it writes nothing the pipeline tracks) and not a Prefect flow: a flow run
would add a server (or a temporary one) and seconds of start-up to a command people run on one
photo.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import torch
from tqdm import tqdm

from fashionnet.data import CLASSES
from fashionnet.errors import InputError
from fashionnet.predict import Invert, Predictions, Source, classify, find_images, load_model
from fashionnet.predict import read_files as read_image_files
from fashionnet.runtime import resolve_precision

FORMATS = ("table", "csv", "json")
PROGRESS_FILES = 2000  # a progress bar (on a terminal) when there are more files than this


def rows(sources: Sequence[Source], predictions: Predictions, top: int) -> list[dict[str, Any]]:
    """One dict per image: file, index (in an .npz/IDX file, else None), inverted, class,
    probability and the ``top`` most probable classes."""
    indices, probabilities = predictions.top(top)
    return [
        {"file": source.file, "index": source.index, "inverted": bool(inverted),
         "class": CLASSES[int(idx[0])], "probability": round(float(prob[0]), 6),
         "top": [{"class": CLASSES[int(i)], "probability": round(float(p), 6)}
                 for i, p in zip(idx, prob, strict=True)]}
        for source, inverted, idx, prob in zip(sources, predictions.inverted, indices,
                                               probabilities, strict=True)
    ]


def write_csv(table: list[dict[str, Any]], top: int, out: TextIO) -> None:
    """Columns file, index, inverted, class, probability, then class_2, probability_2, ... for
    the rest of the top classes."""
    rest = [f"{name}_{k}" for k in range(2, top + 1) for name in ("class", "probability")]
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["file", "index", "inverted", "class", "probability", *rest])
    for row in table:
        others = [v for t in row["top"][1:] for v in (t["class"], f"{t['probability']:.6f}")]
        writer.writerow([row["file"], "" if row["index"] is None else row["index"],
                         str(row["inverted"]).lower(), row["class"],
                         f"{row['probability']:.6f}", *others])


def write_table(table: list[dict[str, Any]], top: int, out: TextIO) -> None:
    """Aligned columns for a terminal; probabilities as percentages."""
    header = ["file", "class", "probability", "inverted", f"top {top}"]
    lines = [header] + [
        [str(Source(row["file"], row["index"])), row["class"], f"{row['probability']:.1%}",
         "yes" if row["inverted"] else "no",
         ", ".join(f"{t['class']} {t['probability']:.1%}" for t in row["top"])]
        for row in table
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    for line in lines:
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
        print("  ".join([*cells, line[-1]]), file=out)


def run(paths: Sequence[str], model: str | os.PathLike[str], top: int = 3,
        fmt: str | None = None, invert: Invert = "auto", skip_bad: bool = False,
        device: str = "cpu", precision: str = "auto", out: TextIO | None = None,
        err: TextIO | None = None) -> None:
    """Predict the images under ``paths`` and write one row per image to ``out``: a table on
    a terminal, CSV otherwise, unless ``fmt`` says. Bad input raises InputError; with
    ``skip_bad`` bad files are reported on ``err`` and the rest predicted."""
    out, err = out or sys.stdout, err or sys.stderr
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device: 'cuda' asked for, but no CUDA device is available")
    files = find_images(paths)
    net = load_model(model).to(device)  # before reading: a bad model fails at once
    with tqdm(total=len(files), unit="file", desc="reading", leave=False, file=err,
              disable=True if len(files) <= PROGRESS_FILES else None) as bar:
        read = read_image_files(files, invert, skip_bad=skip_bad, progress=bar.update)
    for error in read.bad:
        print(f"fashionnet predict: skipped {' '.join(str(error).split())}", file=err)
    if not read.sources:
        raise InputError(f"none of the {len(files)} files holds a readable image")
    dtype = resolve_precision(precision, torch.device(device))
    table = rows(read.sources, classify(read.prepared, net, device, dtype), top)
    fmt = fmt or ("table" if out.isatty() else "csv")
    if fmt == "json":
        out.write(json.dumps(table, indent=1) + "\n")  # to a stream, not a file by path
    elif fmt == "csv":
        write_csv(table, top, out)
    else:
        write_table(table, top, out)
