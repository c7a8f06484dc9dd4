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
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class WriterLock:
    """``PATH.lock`` beside a local store (or task folder) while one writer writes it. A second writer is refused;
    a lock left by a dead process on this host is taken over. (Object stores have no such lock: run one build job
    per store.) Builds lock each store path itself, so a multi-layer build into ``D`` and a single-layer build into
    ``D/block05.zarr`` exclude each other."""

    def __init__(self, path: str, enabled: bool = True, what: str = "build"):
        self.what = what
        self.file = Path(str(path).removeprefix("file://") + ".lock")
        self.enabled = enabled and "://" not in str(path).removeprefix("file://")
        self.held = False

    def __enter__(self) -> "WriterLock":
        if not self.enabled:
            return self
        self.file.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(2):
            try:
                fd = os.open(self.file, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                other = self._read()
                if other.get("host") == me["host"] and not _alive(int(other.get("pid", -1))):
                    self.file.unlink(missing_ok=True)  # stale: its writer died
                    continue
                raise StoreError(f"another {self.what} (pid {other.get('pid')} on {other.get('host')}) is writing "
                                 f"{str(self.file)[:-5]}; wait for it, or delete {self.file} if it is gone") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise StoreError(f"cannot take the writer lock {self.file}")

    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(self.file.read_text())
        except (OSError, ValueError):
            return {}

    def __exit__(self, *exc) -> None:
        if self.held:
            self.file.unlink(missing_ok=True)
            self.held = False


@contextlib.contextmanager
def store_locks(paths: Sequence[str], enabled: bool = True) -> Iterator[None]:
    """The writer lock of every store in ``paths`` (taken in sorted order), held together."""
    with contextlib.ExitStack() as stack:
        for path in sorted({str(Path(str(p).removeprefix("file://"))) if "://" not in str(p).removeprefix("file://")
                            else str(p) for p in paths}):
            stack.enter_context(WriterLock(path, enabled=enabled))
        yield
