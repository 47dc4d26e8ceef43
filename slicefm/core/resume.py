"""Resume only what was made the same way: a stage that skips items already in its output first checks that
they were written under the same identity (its config, its inputs, its code's format), recorded beside them.

A stage calls `may_resume(out, stage, identity)` before skipping anything: True when the output records
this identity; False when it records none (nothing to trust) or another one (with a warning naming what
changed), and then the caller recomputes everything. Either way the output now records this identity, so
the next re-run of the same work resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from typing import Any

from slicefm.core.store import Store

log = logging.getLogger(__name__)


def identity_hash(identity: Mapping[str, Any]) -> str:
    """sha256 of the identity as canonical JSON (key order and whitespace do not matter)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def _changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _record(identity: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps({"identity": dict(identity), "sha256": identity_hash(identity)}, default=str))


def record_identity(out: Store, stage: str, identity: Mapping[str, Any]) -> None:
    """Record that `out`'s items were all made under `identity` (by a step that made every item itself)."""
    out.write_json(f"{stage}.resume.json", _record(identity))


def may_resume(out: Store, stage: str, identity: Mapping[str, Any]) -> bool:
    """Whether `stage`'s finished items in `out` may be kept: only when `out` records this very identity (an
    output without a record, e.g. from older code, cannot be trusted). Records `identity` in `out` either way,
    before any item is written, so an interrupted run resumes."""
    key = f"{stage}.resume.json"
    record = _record(identity)
    previous = out.read_json(key) if out.exists(key) else None
    if previous == record:
        return True
    if previous is not None:
        changed = _changed(previous.get("identity", {}), record["identity"]) or ["(unrecorded)"]
        log.warning(
            "%s: %s was made with a different %s; recomputing every item instead of resuming",
            out.uri(""), stage, ", ".join(changed),
        )  # fmt: skip
    out.write_json(key, record)
    return False
