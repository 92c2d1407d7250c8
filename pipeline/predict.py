"""`fashionnet predict`: classes and probabilities for users' own image files.

Not a DVC stage (it writes nothing the pipeline tracks) and not a Prefect flow: a flow run
would add a server (or a temporary one) and seconds of start-up to a command people run on one
photo.

Images are read, classified and written out chunk by chunk (fashionnet.reading), so memory does
not grow with their number; the rows go to a temporary file first and reach stdout only once
every file has been read, so that a bad file stops the command with nothing written.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import shutil
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from typing import IO, Any, TextIO

import torch
from tqdm import tqdm

from fashionnet.conversion import Invert
from fashionnet.data import CLASSES
from fashionnet.errors import DataError, InputError
from fashionnet.prediction import Predictions, classify, load_model
from fashionnet.reading import Source, find_images, read_images
from fashionnet.runtime import resolve_precision

PROGRESS_FILES = 2000  # a progress bar (on a terminal) when there are more files than this
SPOOL_BYTES = 1 << 20  # rows are held in memory up to this size, then in a temporary file


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


class Output:
    """The rows of one format, spooled (in memory, then a temporary file) and written out at
    the end: a table needs every row for its column widths, and nothing may reach stdout
    before every file has been read.

    CSV: columns file, index, inverted, class, probability, then class_2, probability_2, ...
    for the rest of the top classes. JSON: what ``json.dumps(rows, indent=1)`` writes, one
    record at a time. Table: aligned columns for a terminal; probabilities as percentages.
    """

    def __init__(self, fmt: str, top: int) -> None:
        self.fmt, self.top, self.count = fmt, top, 0
        # Closed by __exit__: the spool lives as long as the command's `with Output(...)`.
        self.spool: IO[str] = tempfile.SpooledTemporaryFile(  # noqa: SIM115
            max_size=SPOOL_BYTES, mode="w+", encoding="utf-8", newline="")
        self.header = ["file", "class", "probability", "inverted", f"top {top}"]
        if fmt == "csv":
            self.csv = csv.writer(self.spool, lineterminator="\n")
            rest = [f"{name}_{k}" for k in range(2, top + 1) for name in ("class", "probability")]
            self.csv.writerow(["file", "index", "inverted", "class", "probability", *rest])

    def add(self, table: list[dict[str, Any]]) -> None:
        for row in table:
            if self.fmt == "csv":
                others = [v for t in row["top"][1:] for v in (t["class"],
                                                             f"{t['probability']:.6f}")]
                self.csv.writerow([row["file"], "" if row["index"] is None else row["index"],
                                   str(row["inverted"]).lower(), row["class"],
                                   f"{row['probability']:.6f}", *others])
            elif self.fmt == "json":
                record = textwrap.indent(json.dumps(row, indent=1), " ")  # a list item's
                self.spool.write(("[\n" if self.count == 0 else ",\n") + record)
            else:  # the table's cells, one JSON list a line, aligned at the end
                cells = [str(Source(row["file"], row["index"])), row["class"],
                         f"{row['probability']:.1%}", "yes" if row["inverted"] else "no",
                         ", ".join(f"{t['class']} {t['probability']:.1%}" for t in row["top"])]
                self.spool.write(json.dumps(cells) + "\n")
            self.count += 1

    def write(self, out: TextIO) -> None:
        """Everything, to ``out``."""
        if self.fmt == "json":
            self.spool.write("\n]\n")
        self.spool.seek(0)
        if self.fmt != "table":
            shutil.copyfileobj(self.spool, out)
            return
        widths = [len(h) for h in self.header[:-1]]
        for line in self.spool:
            widths = [max(w, len(c)) for w, c in zip(widths, json.loads(line), strict=False)]
        self.spool.seek(0)
        for cells in itertools.chain([self.header], map(json.loads, self.spool)):
            padded = [c.ljust(w) for c, w in zip(cells, widths, strict=False)]
            print("  ".join([*padded, cells[-1]]), file=out)

    def __enter__(self) -> Output:
        return self

    def __exit__(self, *exc: object) -> None:
        self.spool.close()  # a temporary file on disk is deleted


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
    bad: list[DataError] = []
    files = find_images(paths, bad if skip_bad else None)
    net = load_model(model).to(device)  # before reading: a bad model fails at once
    dtype = resolve_precision(precision, torch.device(device))
    with Output(fmt or ("table" if out.isatty() else "csv"), top) as output:
        _predict(files, bad, net, device, dtype, invert, skip_bad, output, err)
        if not output.count:
            raise InputError(f"none of the {len(files) + len(bad)} files holds a readable "
                             "image")
        output.write(out)


def _predict(files: list[str], bad: list[DataError], net: torch.nn.Module, device: str,
             dtype: torch.dtype, invert: Invert, skip_bad: bool, output: Output,
             err: TextIO) -> None:
    """Read, classify and add to ``output`` chunk by chunk; report skipped files on ``err``."""
    with tqdm(total=len(files), unit="file", desc="reading", leave=False, file=err,
              disable=True if len(files) <= PROGRESS_FILES else None) as bar:
        for error in bad:
            bar.write(f"fashionnet predict: skipped {' '.join(str(error).split())}", file=err)
        for chunk in read_images(files, invert, skip_bad=skip_bad):
            for error in chunk.bad:
                bar.write(f"fashionnet predict: skipped {' '.join(str(error).split())}",
                          file=err)
            if len(chunk):
                predictions = classify(chunk.prepared, net, device, dtype)
                output.add(rows(chunk.sources, predictions, output.top))
            bar.update(chunk.files)
