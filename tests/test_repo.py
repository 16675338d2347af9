"""The repository itself: no file that git tracks holds a leftover merge-conflict marker."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Built from pieces, so this file does not hold the markers it looks for.
OURS, BASE, THEIRS = "<" * 7 + " ", "=" * 7, ">" * 7 + " "


def conflict_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line that git writes around a conflict."""
    return [(n, line) for n, line in enumerate(text.splitlines(), 1)
            if line.startswith((OURS, THEIRS)) or line.rstrip("\r") == BASE]


def tracked_files() -> list[Path]:
    if shutil.which("git") is None:
        pytest.skip("needs git to list the tracked files")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, timeout=60)
    if listed.returncode != 0:
        pytest.skip(f"not a git checkout: {listed.stderr.decode(errors='replace').strip()}")
    return [ROOT / name for name in listed.stdout.decode().split("\0") if name]


def test_no_tracked_file_holds_a_merge_conflict_marker():
    found = []
    for path in tracked_files():
        if not path.is_file():  # deleted in the work tree, not yet in the index
            continue
        data = path.read_bytes()
        if b"\0" in data:  # binary
            continue
        found += [f"{path.relative_to(ROOT)}:{n}: {line}" for n, line in conflict_lines(data.decode(errors="replace"))]
    assert not found, "merge-conflict markers left in:\n" + "\n".join(found)


def test_the_check_finds_each_marker_and_only_whole_markers():
    """The control: a conflict as git writes it is found line by line; look-alikes are not."""
    conflict = "\n".join(["a", OURS + "HEAD", "b", BASE, "c", THEIRS + "topic", "d"])
    assert [n for n, _ in conflict_lines(conflict)] == [2, 4, 6]
    look_alikes = "\n".join(["=" * 8, "=" * 7 + " x", "<" * 7, "x " + ">" * 7 + " y", "-" * 7])
    assert conflict_lines(look_alikes) == []
