"""Atomic writes: a failure mid-write keeps the previous file, a killed writer's leftovers go,
and every output the code writes goes through fashionnet/files.py."""

from __future__ import annotations

import ast
import errno
import os

import pytest

from fashionnet.files import atomic_path, write_bytes, write_text
from tests.helpers import REPO


def test_write_replaces_the_whole_file(tmp_path):
    target = tmp_path / "out" / "metrics.json"
    write_text(target, "first\n")
    write_bytes(target, b"second\n")
    assert target.read_bytes() == b"second\n"
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600


def test_failure_mid_write_keeps_the_previous_content(tmp_path):
    target = tmp_path / "history.csv"
    write_text(target, "epoch\n1\n")
    with pytest.raises(OSError, match="No space left"), atomic_path(target) as tmp:
        tmp.write_text("epoch\n1\n2")  # half of the new content, then the disk fills up
        raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_text() == "epoch\n1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["history.csv"]


def test_a_killed_writers_leftover_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "train-images-idx3-ubyte"
    leftover = tmp_path / ".train-images-idx3-ubyte.x1y2z3.tmp"  # what kill -9 mid-write leaves
    leftover.write_bytes(b"half")
    other = tmp_path / ".t10k-images-idx3-ubyte.abc.tmp"  # another output's: left alone
    other.write_bytes(b"half")
    write_bytes(target, b"whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, target.name]


# Calls that write a file by path (attribute calls: torch.save, fig.savefig, path.write_text).
WRITERS = {"save", "savez", "savez_compressed", "savefig", "write_text", "write_bytes", "dump",
           "to_csv", "to_json", "copy", "copy2", "copyfile", "copytree"}


def unsafe_writes(source: str) -> list[int]:
    """Lines writing a file outside ``with atomic_path(...)``: they could leave it half written.

    The helpers ``write_text(path, ...)`` and ``write_bytes(path, ...)`` of files.py are atomic.
    Opening to append ("a", "a+": a lock file, a log) replaces nothing, so it is not counted.
    """
    found = []

    def visit(node: ast.AST, inside: bool) -> None:
        if isinstance(node, ast.With | ast.AsyncWith) and any(
                isinstance(item.context_expr, ast.Call)
                and getattr(item.context_expr.func, "id", None) == "atomic_path"
                for item in node.items):
            inside = True
        if isinstance(node, ast.Call) and not inside:
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in WRITERS and (
                    node.args or node.keywords) and not (func.attr == "to_csv" and not node.args):
                found.append(node.lineno)
            mode = node.args[1] if len(node.args) > 1 else next(
                (k.value for k in node.keywords if k.arg == "mode"), None)
            if getattr(func, "id", None) == "open" and isinstance(mode, ast.Constant) and (
                    any(c in str(mode.value) for c in "wx") or str(mode.value).startswith("r+")):
                found.append(node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child, inside)

    visit(ast.parse(source), False)
    return found


def test_the_audit_catches_a_plain_write():
    assert unsafe_writes("import torch\ntorch.save(model.state_dict(), path)\n") == [2]
    assert unsafe_writes("with open(path, 'w') as f:\n    f.write(text)\n") == [1]
    assert unsafe_writes("with open(path, mode='r+b') as f:\n    f.write(text)\n") == [1]
    assert unsafe_writes("with open(lock, 'a+') as f:\n    f.write(pid)\n") == []
    assert unsafe_writes("frame.to_csv('metrics/accuracy.csv')\n") == [1]
    assert unsafe_writes("write_text(frame.to_csv(index=False))\n") == []
    assert unsafe_writes("with atomic_path(p) as tmp, open(tmp, 'wb') as f:\n"
                         "    np.savez(f, a=a)\n") == []


@pytest.mark.parametrize("source", sorted(
    str(p.relative_to(REPO)) for d in ("fashionnet", "pipeline") for p in (REPO / d).glob("*.py")
    if p.name != "files.py"))
def test_every_output_is_written_atomically(source):
    assert unsafe_writes((REPO / source).read_text()) == [], source
