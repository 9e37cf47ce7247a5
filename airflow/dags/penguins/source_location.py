"""Where a source CSV may be read from.

The DAG's ``source_path`` Param is set by whoever may trigger a run, so it can only name the
packaged ``palmerpenguins`` CSV or a regular file inside the source folder
(``PENGUINS_SOURCE_DIR``, default ``airflow/data/`` in this repository). The folder is opened
as configured; every name below it is opened relative to the folder before it and without
following a symbolic link, so a link, or a folder swapped for one while the file is being
opened, can never lead out of it.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from penguins.contract import default_source

SOURCE_DIR_VARIABLE = "PENGUINS_SOURCE_DIR"
DEFAULT_SOURCE_DIR = Path(__file__).resolve().parents[2] / "data"
"""``airflow/data/`` in this repository: beside the DAGs, not among them."""

MAX_PATH_CHARS = 4096



class SourceError(ValueError):
    """The source file cannot be loaded; the message names the file and the problem."""


@dataclass(frozen=True)
class Location:
    """A source file: a trusted ``folder`` and the names below it, down to the file."""

    folder: Path
    """Configuration, opened as it is (symbolic links in its own path are followed)."""
    names: tuple[str, ...]
    """Each opened relative to the folder before it, never following a symbolic link."""

    @classmethod
    def of(cls, path: str | Path) -> Location:
        """A file its caller chose, confined to its own folder (tests, benchmarks, scripts)."""
        path = Path(path).absolute()
        return cls(path.parent, (path.name,))

    @property
    def path(self) -> Path:
        return self.folder.joinpath(*self.names)


def source_folder() -> Path:
    """The folder a ``source_path`` must lie in: ``$PENGUINS_SOURCE_DIR``, or ``airflow/data/``."""
    configured = os.environ.get(SOURCE_DIR_VARIABLE)
    if not configured:
        return DEFAULT_SOURCE_DIR
    if not os.path.isabs(configured):
        # A task's working directory is Airflow's choice, so a relative folder would move.
        raise SourceError(f"{SOURCE_DIR_VARIABLE} must be an absolute path, not "
                          f"{shown(configured)}")
    return Path(configured)


def locate(source_path: str | None) -> Location:
    """Where the DAG may read ``source_path``: the packaged CSV when it is empty or names that
    file, else a file inside the source folder (a relative path is taken from that folder)."""
    packaged = default_source().resolve()  # inside the installed package: trusted as installed
    if not source_path:
        return Location.of(packaged)
    if len(source_path) > MAX_PATH_CHARS or "\0" in source_path:
        raise SourceError(f"source {shown(source_path)}: not a usable path")
    path = PurePosixPath(source_path)
    if path in (PurePosixPath(default_source()), PurePosixPath(packaged)):
        return Location.of(packaged)
    folder = source_folder()
    names = _names_inside(path, folder)
    return Location(folder, names)


def _names_inside(path: PurePosixPath, folder: Path) -> tuple[str, ...]:
    if ".." in path.parts:
        raise SourceError(f"source {shown(path)}: '..' is not allowed; give a path inside the "
                          f"source folder {shown(folder)}")
    relative = path
    if path.is_absolute():
        inside = [path.relative_to(base) for base in (folder, folder.resolve())
                  if path.is_relative_to(base)]
        if not inside:
            raise SourceError(
                f"source {shown(path)} is outside the source folder {shown(folder)} "
                f"({SOURCE_DIR_VARIABLE}); only a file inside it, or the packaged "
                "palmerpenguins CSV, can be read"
            )
        relative = inside[0]
    if not relative.parts:
        raise SourceError(f"source {shown(path)} names the source folder, not a file in it")
    return relative.parts


_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO would otherwise wait for a writer; it is refused below instead.
_BENEATH_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


def open_beneath(location: Location) -> int:
    """Open the file, walking down from its folder one name at a time with O_NOFOLLOW.

    Each step is relative to the folder already open, so nothing renamed or linked along the
    path after a check can redirect the open: there is no check-then-open gap to race.
    """
    where = shown(location.path)
    try:
        current = os.open(location.folder, _FOLDER_FLAGS)
    except OSError:
        raise SourceError(f"source {where}: the folder {shown(location.folder)} cannot be "
                          "opened (it does not exist or is not a folder)") from None
    try:
        for name in location.names[:-1]:
            below = os.open(name, _BENEATH_FLAGS | os.O_DIRECTORY, dir_fd=current)
            os.close(current)
            current = below
        fd = os.open(location.names[-1], _BENEATH_FLAGS, dir_fd=current)
    except OSError as exc:
        raise SourceError(f"source {where}: {_why_not_opened(exc)}") from None
    finally:
        os.close(current)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SourceError(f"source {where}: not a regular file")
    return fd


def _why_not_opened(exc: OSError) -> str:
    reasons = {
        errno.ENOENT: "no such file",
        errno.ELOOP: "a symbolic link, which is not followed",
        errno.ENOTDIR: "a folder on its path is a symbolic link or not a folder",
        errno.EACCES: "permission denied",
        errno.ENAMETOOLONG: "a name on its path is too long",
    }
    return reasons.get(exc.errno, f"cannot be opened ({errno.errorcode.get(exc.errno, exc.errno)})")


def shown(path: object) -> str:
    """A path as a message shows it: cut short, and quoted if it holds unprintable characters."""
    text = str(path)
    if len(text) > 200:
        text = f"{text[:120]}...{text[-60:]}"
    return text if text.isprintable() else repr(text)
