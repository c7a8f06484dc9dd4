"""One answer to "is this the same settings?" when a run resumes: build, profile and active learning.

Callers record and compare *resolved* values (layer and block indices, not how they were spelt), so
`--layer layer3.1` resumes a store begun with `--layer 6`; the refusal names the keys that differ.
"""
from __future__ import annotations

from .errors import ConfigError


def changed_keys(before: dict | None, now: dict) -> list[str]:
    """The keys whose values differ between two recorded settings (a key missing on one side differs)."""
    before = before or {}
    return sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))


def require_same(before: dict | None, now: dict, what: str, advice: str,
                 error: type[Exception] = ConfigError) -> None:
    """Refuse to resume when the settings recorded (``before``) are not ``now``'s: one line, ``what``
    ("{out} holds a profile trained with other settings"), the keys that differ, then ``advice``."""
    changed = changed_keys(before, now)
    if changed:
        raise error(f"{what} ({', '.join(changed)} differ); {advice}")
