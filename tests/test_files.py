"""detox_sft.files: a file or directory a rerun trusts is complete or absent, never half written."""

from __future__ import annotations

import json
import os

import pytest

from detox_sft import files


def test_atomic_write_replaces_whole_or_leaves_the_old_file(tmp_path):
    path = files.atomic_write_json(tmp_path / "sub" / "marker.json", {"done": True})
    assert json.loads(path.read_text()) == {"done": True}
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # the mode a plain open() gives, not mkstemp's 0600

    with pytest.raises(RuntimeError), files.atomic_writer(path) as fh:
        fh.write('{"done": fal')
        raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"done": True}
    assert os.listdir(path.parent) == ["marker.json"]  # no temporary file left


def test_a_damaged_marker_reads_as_absent(tmp_path):
    (tmp_path / "truncated.json").write_text('{"global_step": 4, "train_')
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe")
    for name in ("truncated.json", "binary.json", "missing.json"):
        assert files.read_json_or_none(tmp_path / name) is None
    assert files.read_json_or_none(files.atomic_write_json(tmp_path / "ok.json", [1])) == [1]


def test_dir_writer_swaps_in_a_complete_directory_only(tmp_path):
    target = tmp_path / "export"
    with files.dir_writer(target) as building:
        assert building.parent == tmp_path and building.name.startswith(".export.")
        (building / "model").write_text("v1")
    assert (target / "model").read_text() == "v1"

    with pytest.raises(KeyboardInterrupt), files.dir_writer(target) as building:
        (building / "model").write_text("half of v2")
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["export"] and (target / "model").read_text() == "v1"

    # what a SIGKILL leaves (a half-built directory, an old one moved aside) is cleared by the next writer
    (tmp_path / ".export.killed.tmp").mkdir()
    (tmp_path / ".export.old.killed.tmp").mkdir()
    with files.dir_writer(target) as building:
        (building / "model").write_text("v2")
    assert os.listdir(tmp_path) == ["export"] and os.listdir(target) == ["model"]
    assert (target / "model").read_text() == "v2"
