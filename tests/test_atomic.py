"""Atomic writes leave either the old file or the new one, never a partial one."""

from __future__ import annotations

import pytest

from fed_iotlm.atomic import atomic_write, atomic_write_text


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_text(target, "old")

    def half_then_fail(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_new_file_gets_a_normal_mode_and_parent_dirs(tmp_path):
    target = tmp_path / "a" / "b.txt"
    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert target.stat().st_mode & 0o044  # readable by others, not mkstemp's 0600
