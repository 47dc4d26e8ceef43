"""Keyed-hash pseudonyms for patient and scan identifiers (HMAC-SHA256).

The same key maps the same source identifier to the same pseudonym, so re-ingesting a dataset or
adding scans keeps IDs stable; without the key the mapping cannot be inverted or recomputed.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

log = logging.getLogger(__name__)

KEY_ENV = "SLICEFM_PSEUDONYM_KEY"
MIN_KEY_BYTES = 16


def _digest(key: bytes, kind: str, value: str) -> str:
    return hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()[:16]


def patient_pseudonym(key: bytes, cohort: str, patient_ref: str) -> str:
    """'P' + 16 hex; the cohort is part of the message so equal local IDs in two cohorts differ."""
    return "P" + _digest(key, "patient", f"{cohort}/{patient_ref}")


def scan_pseudonym(key: bytes, cohort: str, scan_ref: str) -> str:
    """'S' + 16 hex for a scan (series UID, file path or dataset volume name)."""
    return "S" + _digest(key, "scan", f"{cohort}/{scan_ref}")


def load_key(key_file: Path | None = None, env: dict[str, str] | None = None) -> bytes:
    """Resolve the pseudonymisation key: $SLICEFM_PSEUDONYM_KEY, else a key file (created, mode 0600, if absent).

    Keep the key out of the dataset and the artifact store: whoever holds it can re-link pseudonyms
    to a list of known source IDs.
    """
    env = os.environ if env is None else env
    if env.get(KEY_ENV):
        key = env[KEY_ENV].encode()
    else:
        if key_file is None:
            raise ValueError(f"no pseudonymisation key: set {KEY_ENV} or pass a key file")
        if not key_file.exists():
            key_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = key_file.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))
            os.replace(tmp, key_file)
            log.warning("created a new pseudonymisation key at %s (set %s to share one)", key_file, KEY_ENV)
        key = key_file.read_text().strip().encode()
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"pseudonymisation key too short ({len(key)} bytes; need >= {MIN_KEY_BYTES})")
    return key
