"""Running under `torchrun`: ranks, barriers, shards of work; and a writer lock for stores without torchrun.

`build` under torchrun: every rank takes a contiguous run of whole-chunk units of each split and writes only the
chunks it owns (no padding duplicates, unlike the stock DistributedSampler); rank 0 creates the stores, and marks
them complete after a barrier. `train` under torchrun: DDP, each rank reading its own shard of the cache.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import filelock
import torch
import torch.distributed as dist

from .errors import StoreError

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 when not under torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "Dist":
        """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK; join the process group (gloo on CPU, nccl on CUDA)."""
        world = int(os.environ.get("WORLD_SIZE", 1))
        me = cls(int(os.environ.get("RANK", 0)), world, int(os.environ.get("LOCAL_RANK", 0)))
        if world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return me

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value`` on every rank."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, value: int) -> int:
        """Sum of an integer over all ranks."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t)
        return int(t.item())

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous part of ``items`` (sizes differ by at most one; nothing duplicated)."""
        n, w, r = len(items), self.world, self.rank
        lo, hi = r * n // w, (r + 1) * n // w
        return list(items[lo:hi])

    def on_main(self, fn: Callable[[], T], others: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 and then ``others`` on the other ranks; an error on rank 0 is raised everywhere."""
        error, result = None, None
        if self.main:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - shared with the other ranks, then re-raised
                error = exc
        message = self.broadcast(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        if message is not None:
            raise StoreError(f"rank 0 failed: {message}")
        return result if self.main else others()


# -- a lock for writers that are not one torchrun job ---------------------------------------------------------
class WriterLock:
    """An OS lock (`filelock.FileLock`: ``flock`` on POSIX) on ``PATH.lock`` beside a local store (or task folder)
    while one writer writes it. A second writer is refused at once; the kernel releases the lock when its holder
    dies, so no lock is ever stale and no takeover can race. The holder's pid and host (``PATH.lock.holder``) are
    only a message. (Object stores have no such lock: run one build job per store.) Builds lock each store path
    itself, so a multi-layer build into ``D`` and a single-layer build into ``D/block05.zarr`` exclude each other."""

    def __init__(self, path: str, enabled: bool = True, what: str = "build", wait: float = 0):
        self.what, self.path, self.wait = what, str(path).removeprefix("file://"), wait
        self.file, self.holder = Path(self.path + ".lock"), Path(self.path + ".lock.holder")
        self.enabled = enabled and "://" not in self.path
        self.lock: filelock.FileLock | None = None

    def __enter__(self) -> "WriterLock":
        if not self.enabled:
            return self
        self.file.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(self.file), timeout=self.wait)
        try:
            lock.acquire()
        except filelock.Timeout:
            other = self._read()
            raise StoreError(f"another {self.what} (pid {other.get('pid', '?')} on {other.get('host', '?')}) is "
                             f"writing {self.path}; wait for it to finish (its lock {self.file} is released when "
                             f"it exits)") from None
        self.lock = lock
        try:  # only a message for the next writer: a full disk must not fail (or strand) the lock itself
            self.holder.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
        except OSError:
            self.holder.unlink(missing_ok=True)
        return self

    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(self.holder.read_text())
        except (OSError, ValueError):
            return {}

    def __exit__(self, *exc) -> None:
        if self.lock is not None:
            self.holder.unlink(missing_ok=True)
            self.lock.release()
            self.lock = None


@contextlib.contextmanager
def reading_lock(path: str, wait: float = 60.0) -> Iterator[None]:
    """A shared ``flock`` on the store's ``PATH.lock`` while a reader takes a snapshot (labels and their classes):
    several readers share it, a writer (`WriterLock`: build, ``labels add``) waits or is refused meanwhile, and the
    reader waits up to ``wait`` seconds for a writer. Remote stores, read-only media and systems without ``fcntl``
    go unlocked (no writer can take the lock there either)."""
    local = str(path).removeprefix("file://")
    fd = None if "://" in local else _shared(local, time.monotonic() + wait)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # closing releases the flock


def _shared(path: str, deadline: float) -> int | None:
    """A descriptor holding a shared flock on ``path.lock`` (the file still at that path), or None where no lock
    can be taken (read-only media, no ``fcntl``)."""
    try:
        import fcntl
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o666)
    except (ImportError, OSError):
        return None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            if os.path.samestat(os.fstat(fd), os.stat(path + ".lock")):
                return fd  # not a lock file a writer has just unlinked
        except BlockingIOError:
            pass
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            os.close(fd)
            raise StoreError(f"{path} is being written by another process; retry when it has finished")
        os.close(fd)
        time.sleep(0.05)
        try:
            fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:
            return None


@contextlib.contextmanager
def store_locks(paths: Sequence[str], enabled: bool = True) -> Iterator[None]:
    """The writer lock of every store in ``paths`` (taken in sorted order), held together."""
    with contextlib.ExitStack() as stack:
        for path in sorted({str(Path(str(p).removeprefix("file://"))) if "://" not in str(p).removeprefix("file://")
                            else str(p) for p in paths}):
            stack.enter_context(WriterLock(path, enabled=enabled))
        yield
