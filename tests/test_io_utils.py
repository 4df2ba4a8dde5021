"""Atomic writers (lobes/io_utils.py): what they leave is what a plain open() / mkdir would have left."""
import os
import stat

import pytest

from lobes.io_utils import atomic_dir, atomic_path, atomic_write


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_and_folders_get_the_umask_mode_not_mkstemps_private_one(tmp_path):
    """mkstemp makes 0600 files and mkdtemp 0700 folders: an experiment folder or a model export written that way
    could not be read by the rest of a lab's group on a shared cluster. Under umask 022: 0644 and 0755."""
    mask = os.umask(0o022)
    os.umask(mask)
    if mask != 0o022:
        pytest.skip(f"the process umask is {mask:03o}; the modes below assume 022")
    with atomic_write(tmp_path / "a.txt") as f:
        f.write("x")
    with atomic_path(tmp_path / "b.bin") as tmp:
        with open(tmp, "wb") as f:
            f.write(b"x")
    with atomic_dir(tmp_path / "export", "MARK", "the test") as stage:
        (stage / "MARK").write_text("")
    assert (_mode(tmp_path / "a.txt"), _mode(tmp_path / "b.bin"), _mode(tmp_path / "export")) == (0o644, 0o644, 0o755)
    assert (tmp_path / "a.txt").read_text() == "x" and (tmp_path / "export" / "MARK").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "export"]  # no temp left
