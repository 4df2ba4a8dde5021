"""Atomic file writing: a crash never leaves a half-written manifest, vector, checkpoint or table."""
import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp / mkdtemp create 0600 / 0700 (private); the renamed result gets the mode a plain open() / mkdir would
# have given, so an experiment or export stays readable by the group / the others the umask allows
_UMASK = _umask()
FILE_MODE, DIR_MODE = 0o666 & ~_UMASK, 0o777 & ~_UMASK


@contextlib.contextmanager
def atomic_write(path, mode="w", **open_kwargs):
    """Open a temp file next to ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temp path for writers that want a file name (torch.save, safetensors, savefig)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(out, marker, tool):
    """Yield a staging folder next to ``out``; rename it over ``out`` only if the block succeeds.

    A non-empty ``out`` is replaced only when it holds ``marker`` (a file the generating tool writes there),
    so that a mistyped ``--out`` never deletes a folder the tool did not make.

    Arguments
    ---------
    out : str or Path
        The folder to create or replace.
    marker : str
        Name of the file, inside ``out``, that marks a folder the tool made.
    tool : str
        Name of the generating tool, shown in the error.

    Yields
    ------
    Path
        The empty staging folder (a hidden sibling of ``out``) to write into.
    """
    out = Path(out).resolve()
    if out.exists() and any(out.iterdir()) and not (out / marker).exists():
        raise FileExistsError(f"{out} exists, is not empty and was not made by {tool}; not replacing it")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield stage
        os.chmod(stage, DIR_MODE)
        if out.exists():
            shutil.rmtree(out)
        os.replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


_HELD_LOCKS = {}  # path -> fd: held until the process exits (the kernel drops a flock when its holder dies)


def hold_lock(path, what):
    """An exclusive lock on ``path`` (created if missing) for the rest of this process; a DataError naming
    ``what`` if another process holds it. flock, so a killed holder never leaves a stale lock behind."""
    from lobes.errors import DataError

    path = Path(path)
    if str(path) in _HELD_LOCKS:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataError(f"{what} is in use by another running process (lock {path}); give each concurrent run its "
                        "own folder, or run them one after another (run.sh --nj 1)") from None
    _HELD_LOCKS[str(path)] = fd
