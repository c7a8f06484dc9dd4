"""One answer to "is this the same settings?" when a run resumes: build, profile and active learning.

Callers record and compare *resolved* values (layer and block indices, not how they were spelt), so
`--layer layer3.1` resumes a store begun with `--layer 6`; the refusal names the keys that differ.
"""
from __future__ import annotations

from .devices import resolve_device
from .errors import ConfigError

_MISSING = object()


def changed_keys(before: dict | None, now: dict) -> list[str]:
    """The keys whose values differ between two recorded settings (a key missing on one side differs, also from
    one recorded as None)."""
    before = before or {}
    return sorted(k for k in set(before) | set(now) if before.get(k, _MISSING) != now.get(k, _MISSING))


def upgraded_train(saved: dict) -> dict:
    """A training config recorded by an earlier version, in today's terms: ``precision: auto`` (bf16 on CUDA, fp32
    elsewhere, until fp32 became the default) becomes what it meant on the device the run resolves to here; a record
    from before ``compile`` existed ran uncompiled, as ``auto`` does wherever compiling was not measured to pay."""
    saved = {"compile": "auto", **saved}
    if saved.get("precision") != "auto":
        return saved
    try:
        cuda = resolve_device(saved.get("device", "auto")).type == "cuda"
    except ConfigError:  # a device this machine lacks: left as recorded, so the check names it
        return saved
    return {**saved, "precision": "bf16" if cuda else "fp32"}


def require_same(before: dict | None, now: dict, what: str, advice: str,
                 error: type[Exception] = ConfigError) -> None:
    """Refuse to resume when the settings recorded (``before``) are not ``now``'s: one line, ``what``
    ("{out} holds a profile trained with other settings"), the keys that differ, then ``advice``."""
    changed = changed_keys(before, now)
    if changed:
        raise error(f"{what} ({', '.join(changed)} differ); {advice}")
