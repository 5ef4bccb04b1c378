"""hooktrain.checkpoint.files: the one way hooktrain replaces a file (readers see the old or the new one)."""

from __future__ import annotations

import os

import pytest

from hooktrain.checkpoint.files import atomic_path, write_atomically


def test_atomic_path_renames_a_complete_file_into_place(tmp_path):
    target = tmp_path / "sub" / "out.bin"  # the parent is created
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".tmp-out.bin")
        tmp.write_bytes(b"new")
        assert not target.exists()  # nothing under the name before the block ends
    assert target.read_bytes() == b"new"
    assert os.listdir(target.parent) == ["out.bin"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target, fsync=True) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed midway")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_write_atomically_text_bytes_and_modes(tmp_path):
    text, data = tmp_path / "a.txt", tmp_path / "b.bin"
    write_atomically(text, "line\n", fsync=True)
    write_atomically(data, b"\x00\x01")
    assert text.read_text() == "line\n" and data.read_bytes() == b"\x00\x01"
    umask = os.umask(0)
    os.umask(umask)
    target = tmp_path / "c.safetensors"
    with atomic_path(target, default_mode=True) as tmp:
        tmp.touch(mode=0o600)  # as safetensors creates its files
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(os.listdir(tmp_path)) == ["a.txt", "b.bin", "c.safetensors"]
