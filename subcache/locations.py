"""Where a store lives: one seam between local folders and object stores (fsspec URLs such as ``s3://…`` or
``memory://…``), so that no call site branches on the kind of path.

A local store can be built aside and renamed into place whole, has ``.partial`` litter to sweep after a kill, and
a parent folder that must be writable; an object store has none of these and is created in place. Both say whether
they exist, remove themselves, count their bytes and tell whether they overlap another location.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import zarr


def location(path: str | os.PathLike) -> "Location":
    """The location of ``path``: local for plain paths and ``file://`` URLs, an object store for other URLs."""
    text = str(path)
    return LocalLocation(text) if "://" not in text or text.startswith("file://") else ObjectLocation(text)


class Location:
    """A store's place. Subclasses answer each question for their kind of storage."""

    def __init__(self, path: str):
        self.path = path

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r})"

    def exists(self) -> bool:
        raise NotImplementedError

    def absolute(self) -> str:
        """A name that is the same from any working directory (a cache's identity records it)."""
        return self.path

    def is_file(self) -> bool:
        return False

    def is_empty_folder(self) -> bool:
        return False

    def remove(self) -> None:
        raise NotImplementedError

    def sweep_partials(self) -> int:
        """Remove the temp files a killed writer leaves behind; returns how many."""
        return 0

    def nbytes(self) -> int:
        """Bytes on disk (0 where the storage does not say cheaply)."""
        return 0

    def writable_problem(self) -> str | None:
        """Why nothing can be written here, or None."""
        return None

    def overlaps(self, other: "Location") -> bool:
        return self.path.rstrip("/") == other.path.rstrip("/")

    def create_whole(self, create: Callable[[str], object]) -> None:
        """Run ``create(path)`` so that a kill leaves no half-created store at this location."""
        create(self.path)


class LocalLocation(Location):
    """A folder on a local file system."""

    @property
    def local(self) -> Path:
        return Path(self.path.removeprefix("file://"))

    def exists(self) -> bool:
        return self.local.exists()

    def absolute(self) -> str:
        return str(self.local.absolute())

    def is_file(self) -> bool:
        return self.local.is_file()

    def is_empty_folder(self) -> bool:
        return self.local.is_dir() and not any(self.local.iterdir())

    def remove(self) -> None:
        if self.local.is_dir():
            shutil.rmtree(self.local)
        elif self.local.exists():
            self.local.unlink()

    def sweep_partials(self) -> int:
        litter = list(self.local.rglob("*.partial"))
        for f in litter:
            f.unlink(missing_ok=True)
        return len(litter)

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.local.rglob("*") if f.is_file())

    def writable_problem(self) -> str | None:
        parent = self.local.absolute().parent
        while not parent.exists():
            parent = parent.parent
        return None if os.access(parent, os.W_OK) else f"{parent} is not writable"

    def overlaps(self, other: Location) -> bool:
        if not isinstance(other, LocalLocation):
            return False
        a, b = self.local.resolve(), other.local.resolve()
        return a == b or a in b.parents or b in a.parents

    def create_whole(self, create: Callable[[str], object]) -> None:
        """Built aside (``PATH.creating``) and renamed into place whole."""
        staging = LocalLocation(f"{self.local}.creating")
        staging.remove()
        create(staging.path)
        os.rename(staging.local, self.local)


class ObjectLocation(Location):
    """A prefix in an object store, reached through fsspec (zarr's FsspecStore)."""

    def exists(self) -> bool:
        try:
            zarr.open_group(self.path, mode="r")
            return True
        except (FileNotFoundError, zarr.errors.GroupNotFoundError):  # type: ignore[attr-defined]
            return False

    def remove(self) -> None:
        zarr.open_group(self.path, mode="w")  # overwrites the group in place
