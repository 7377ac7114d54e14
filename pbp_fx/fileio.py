"""Output files and folders: atomic writes (a temporary file beside the target, renamed into place)
and the folders a run creates.

A crash or an error mid-write leaves the previous file (or none) intact, never half a file.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Callable, Iterator, Type

from .errors import PBError

__all__ = ["atomic_write", "check_output_dir", "folder_held", "make_folders", "remove_empty", "umask"]


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_dir(out: str, error: Type[Exception] = PBError, resumed: bool = False) -> None:
    """Refuse an --out folder path that cannot become a writable folder (a file, under a file, in a
    folder that is not writable), before any work starts; nothing is created. resumed: `out` is
    the run folder --resume names (the fix is then a writable copy, not another --out)."""
    out = os.path.abspath(out)
    if os.path.islink(out) and not os.path.exists(out):
        raise error(f"--out {out!r} is a link to nothing ({os.readlink(out)}): remove it or choose another path")
    probe = out
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if probe == out and not os.path.isdir(out):
        raise error(f"--out {out!r} exists and is not a directory: choose a folder path")
    if not os.path.isdir(probe):
        raise error(f"--out {out!r}: {probe} is a file, not a directory; choose another path")
    _check_name_lengths(out, probe, error)
    try:  # a folder made and removed: os.access says yes to root, also where nothing can be made (/proc)
        os.rmdir(tempfile.mkdtemp(prefix=".pbp-probe-", dir=probe))
    except OSError as exc:
        if resumed:
            raise error(f"--resume {out!r}: nothing can be written in the run folder ({exc.strerror}); copy it "
                        "somewhere writable and resume the copy (cp -r RUN COPY; pbp-fx train --resume COPY)") from None
        raise error(f"--out {out!r}: nothing can be written in {probe} ({exc.strerror}); choose another path") from None


# Room for the longest file name a run writes in its folder, a temporary file's suffix included.
_LONGEST_FILE_NAME = 64


def _check_name_lengths(out: str, probe: str, error: Type[Exception]) -> None:
    """Refuse a path whose missing folder names, or whole length, this file system cannot hold
    (ENAMETOOLONG would come after the work, leaving the folders above it behind)."""
    try:
        name_max, path_max = os.pathconf(probe, "PC_NAME_MAX"), os.pathconf(probe, "PC_PATH_MAX")
    except (ValueError, OSError, AttributeError):  # (no pathconf: not checked)
        return
    long = next((n for n in os.path.relpath(out, probe).split(os.sep) if len(os.fsencode(n)) > name_max), None)
    if long is not None:
        raise error(f"--out: the folder name {long[:40]}... is {len(os.fsencode(long))} bytes, more than the "
                    f"{name_max} this file system takes; choose a shorter path")
    if len(os.fsencode(out)) + _LONGEST_FILE_NAME >= path_max:  # (the files written inside it count too)
        raise error(f"--out: the path is {len(os.fsencode(out))} bytes, too long for the files inside it (this "
                    f"system takes {path_max - 1}); choose a shorter path")


def atomic_write(path, write: Callable[[str], None], error: Type[Exception] = PBError, what: str = "file") -> None:
    """Call write(tmp_path), then rename the temporary file onto `path`.

    Failures to write are raised as `error` with a one-line message naming `what` and `path`.
    """
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise error(f"cannot write {what} {path}: {folder} is a file, not a directory; choose another path")
    if not os.path.isdir(folder):
        raise error(f"cannot write {what} {path}: directory {folder} does not exist; create it first "
                    f"(mkdir -p {folder})")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise error(f"cannot write {what} {path}: {e.strerror or e}; choose a writable directory") from e
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600: give the file the usual mode
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, PBError):
            raise error(f"cannot write {what} {path}: {e.strerror or e}") from e
        raise


@contextlib.contextmanager
def folder_held(path: str, error: Type[Exception] = PBError) -> Iterator[None]:
    """The folder `path` held by this block alone: a second run writing the same --out at once is refused (two runs
    left one folder holding one's reports beside the other's checkpoint). An exclusive flock on the folder itself,
    so no lock file is left behind; released when the block ends, or the process does. Where the platform or the
    file system has no flock, nothing is held."""
    try:
        import fcntl
    except ImportError:  # (Windows)
        yield
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise error(f"{path} is in use: another pbp-fx run writes there now; give another folder, or wait for "
                        "that run to end") from None
        except OSError:  # (no locks on this file system)
            pass
        yield
    finally:
        os.close(fd)


def make_folders(path: str) -> list[str]:
    """os.makedirs(path, exist_ok=True); returns the folders it created, deepest first, as paths
    the way `path` names them (the system resolves a symlinked parent, or x/.., for each alike)."""
    missing, folder = [], path.rstrip(os.sep) or path
    while folder and not os.path.isdir(folder):
        if os.path.basename(folder) not in (os.curdir, os.pardir):  # (x/.. is no folder of its own)
            missing.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        remove_empty(missing[next((i for i, f in enumerate(missing) if os.path.isdir(f)), len(missing)):])
        raise  # (the ones it made are gone: a failure leaves no folder behind)
    return missing


def remove_empty(folders: list[str]) -> None:
    """Remove `make_folders`' folders, deepest first, while they are empty (a run that wrote nothing)."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:  # (not empty, or gone: the ones above it stay too)
            return
