"""What every selection method shares about runs: the profile's settings, a profile's rows and their summary,
and reading/writing them (resumable). A run's row comes from `batched.run_windows`."""
from __future__ import annotations

import csv
import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from ..errors import ConfigError
from ..labels import check_identity
from ..settings import require_same, upgraded_train
from ..task import atomic_write
from ..train import TrainConfig


@dataclass(frozen=True)
class ProfileConfig:
    blocks: str | None = None  # range LOW-HIGH; default: the cached layer to the last block
    widths: tuple[int, ...] = (1,)
    seeds: int = 1  # runs per window (seeds 0..K-1): mean ± std
    probe: bool = True  # also the linear probe, the baseline line
    train: TrainConfig = field(default_factory=TrainConfig)
    val_fraction: float = 0.0  # > 0: carve a validation set from the training split and select on it
    halving: bool = False  # successive halving instead of training every window to the end
    eta: int = 3  # halving: keep the best 1/eta of the windows at each rung
    min_epochs: int = 1  # halving: epochs of the first rung (×eta per rung, up to train.epochs)
    prior: str | None = None  # halving: "rank" keeps rank's best 1/eta windows before the first rung
    batch_runs: str = "auto"  # auto | off | K: a window's seeds trained together as one batched model (`batched`)


FIELDS = ("blocks", "first", "width", "seed", "test_accuracy", "val_accuracy", "trainable_params", "seconds")


@dataclass
class ProfileResult:
    rows: list[dict]
    out: str | None = None

    def summary(self) -> list[dict]:
        """Mean ± std over seeds per window, sorted by width then first block."""
        groups: dict[tuple, list[dict]] = {}
        for r in self.rows:
            groups.setdefault((r["width"], r["first"], r["blocks"]), []).append(r)
        out = []
        for (width, first, blocks), rs in sorted(groups.items()):
            accs = [r["test_accuracy"] for r in rs]
            out.append({"blocks": blocks, "first": first, "width": width, "runs": len(rs),
                        "mean": statistics.fmean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                        "trainable_params": rs[0]["trainable_params"]})
            if all(r.get("val_accuracy") is not None for r in rs):
                out[-1]["val_mean"] = statistics.fmean(r["val_accuracy"] for r in rs)
        return out

    def best(self) -> dict | None:
        """The window a tool would pick: best mean validation accuracy when measured, else best test accuracy."""
        windows_only = [s for s in self.summary() if s["width"] > 0]
        return max(windows_only, key=lambda s: s.get("val_mean", s["mean"])) if windows_only else None


def load_rows(out: str | None, train_config: TrainConfig, identity: dict | None = None,
               name: str = "profile.json", extra: dict | None = None) -> list[dict]:
    """Finished runs of an earlier (interrupted) profile in ``out`` — refused if they were trained otherwise or
    (given ``identity``) on another cache or labels. ``extra``: further config fields that must match (absent from
    older files: read as 0.0)."""
    if not (out and (Path(out) / name).is_file()):
        return []
    saved = json.loads((Path(out) / name).read_text())
    if identity is not None:
        check_identity(saved.get("identity"), identity, out)
    before = {k: v for k, v in upgraded_train(saved["config"]["train"]).items() if k not in ("blocks", "seed")}
    now = {k: v for k, v in asdict(train_config).items() if k not in ("blocks", "seed")}
    before.update({k: saved["config"].get(k, 0.0) for k in extra or {}})
    now.update(extra or {})
    require_same(before, now, f"{out} holds a profile trained with other settings",
                 "use another --out or the same options")
    return list(saved["runs"])


def write_csv(path: str, fields: Sequence[str], rows: list[dict]) -> None:
    """The rows as CSV with ``fields`` as columns (other keys of a row are left out)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def save_runs(folder: str | Path, name: str, meta: dict, fields: Sequence[str], rows: list[dict]) -> None:
    """``NAME.json`` (``meta``, which holds every run: what a rerun reads back) and ``NAME.csv`` (the rows), each
    written atomically: a killed run keeps every finished run, never a half-written file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / f"{name}.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)))
    atomic_write(folder / f"{name}.csv", lambda tmp: write_csv(tmp, fields, rows))


def load_profile(profile_dir: str) -> ProfileResult:
    path = Path(profile_dir) / "profile.json"
    if not path.is_file():
        raise ConfigError(f"{profile_dir} holds no profile.json; run `subcache profile --out {profile_dir}` first")
    return ProfileResult(json.loads(path.read_text())["runs"], profile_dir)

