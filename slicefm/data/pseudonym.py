"""Keyed-hash pseudonyms for patient and scan identifiers (HMAC-SHA256), and the key's one home.

The same key maps the same source identifier to the same pseudonym, so re-ingesting a dataset or
adding scans keeps IDs stable; without the key the mapping cannot be inverted or recomputed.

Where the key comes from (the same rule for every verb, component and pipeline run, wherever it runs):
1. ``$SLICEFM_PSEUDONYM_KEY``: the key itself (how a Kubernetes Secret reaches a pod);
2. else the key file ``$SLICEFM_PSEUDONYM_KEY_FILE`` (a mounted secret, a shared path);
3. else ``$XDG_CONFIG_HOME/slicefm/pseudonym.key`` (``~/.config/slicefm/pseudonym.key``): one per user,
   never relative to the working directory or a checkout.
A key file is created only on request (``slicefm key init``; ``make run-pipeline`` does so for the demo).
Outputs record the key's fingerprint (a keyed hash of a fixed string), never the key, so stages that
combine cohorts can refuse IDs made with different keys.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

KEY_ENV = "SLICEFM_PSEUDONYM_KEY"
KEY_FILE_ENV = "SLICEFM_PSEUDONYM_KEY_FILE"
MIN_KEY_BYTES = 16
_FINGERPRINT_MESSAGE = b"slicefm pseudonym key fingerprint v1"


class MissingKeyError(RuntimeError):
    """No key in the environment and no key file where the rule says it lives."""


class KeyMismatchError(ValueError):
    """Inputs pseudonymised with different keys were combined."""


def _digest(key: bytes, kind: str, value: str) -> str:
    return hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()[:16]


def patient_pseudonym(key: bytes, cohort: str, patient_ref: str) -> str:
    """'P' + 16 hex; the cohort is part of the message so equal local IDs in two cohorts differ."""
    return "P" + _digest(key, "patient", f"{cohort}/{patient_ref}")


def scan_pseudonym(key: bytes, cohort: str, scan_ref: str) -> str:
    """'S' + 16 hex for a scan (series UID, file path or dataset volume name)."""
    return "S" + _digest(key, "scan", f"{cohort}/{scan_ref}")


def key_fingerprint(key: bytes) -> str:
    """'K' + 16 hex: an HMAC of a fixed string under the key. Equal keys give equal fingerprints; the
    fingerprint reveals nothing about the key and cannot be used to compute pseudonyms."""
    return "K" + hmac.new(key, _FINGERPRINT_MESSAGE, hashlib.sha256).hexdigest()[:16]


def key_file_path(env: Mapping[str, str] | None = None) -> Path:
    """Where the key file lives: $SLICEFM_PSEUDONYM_KEY_FILE, else <XDG config dir>/slicefm/pseudonym.key."""
    env = os.environ if env is None else env
    if env.get(KEY_FILE_ENV):
        return Path(env[KEY_FILE_ENV]).expanduser()
    config_home = Path(env.get("XDG_CONFIG_HOME") or Path(env.get("HOME") or Path.home()) / ".config")
    return config_home.expanduser() / "slicefm" / "pseudonym.key"


def key_origin(env: Mapping[str, str] | None = None) -> str:
    """Where load_key takes the key from, for messages ("$SLICEFM_PSEUDONYM_KEY" or the file's path)."""
    env = os.environ if env is None else env
    return f"${KEY_ENV}" if env.get(KEY_ENV) else str(key_file_path(env))


def load_key(env: Mapping[str, str] | None = None, *, create: bool = False) -> bytes:
    """The pseudonymisation key by the module's rule. A missing key file is an error (MissingKeyError)
    unless `create`, which writes a new random key there (mode 0600) and logs its path and fingerprint.

    Keep the key out of the dataset and the artifact store: whoever holds it can re-link pseudonyms
    to a list of known source IDs.
    """
    env = os.environ if env is None else env
    if env.get(KEY_ENV):
        return _checked(env[KEY_ENV].encode(), f"${KEY_ENV}")
    path = key_file_path(env)
    if not path.exists():
        if not create:
            raise MissingKeyError(
                f"no pseudonymisation key: ${KEY_ENV} is unset and there is no key file at {path}. "
                f"Create one with `slicefm key init` (or point ${KEY_FILE_ENV} at the key your site uses); "
                "every ingest must use the same key, or the same patient gets different IDs"
            )
        key = create_key(path)
        log.warning(
            "created a new pseudonymisation key at %s (fingerprint %s); keep it: re-ingesting with another "
            "key gives every patient new IDs",
            path,
            key_fingerprint(key),
        )
        return key
    return _checked(path.read_text().strip().encode(), str(path))


def create_key(path: Path) -> bytes:
    """Write a new random key to `path` (mode 0600, atomically); refuses to replace an existing one."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already holds a pseudonymisation key; remove it first to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)  # unlike a rename, fails if another process created the key meanwhile
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_text().strip().encode()


def _checked(key: bytes, origin: str) -> bytes:
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(
            f"pseudonymisation key from {origin} too short ({len(key)} bytes; need >= {MIN_KEY_BYTES})"
        )
    return key


def require_same_key(fingerprints: Mapping[str, str | None], what: str) -> str | None:
    """The one key fingerprint of `fingerprints` (input name -> fingerprint; None = not recorded, skipped).

    Raises KeyMismatchError naming every input and its fingerprint when they differ: pseudonyms made with
    different keys do not match, so patient-level splits, pooling and comparisons would silently be wrong.
    """
    known = {name: fp for name, fp in fingerprints.items() if fp}
    unknown = sorted(name for name, fp in fingerprints.items() if not fp)
    if unknown and known:
        log.warning("%s: no pseudonymisation key fingerprint recorded for %s (older outputs?)", what, unknown)
    if len(set(known.values())) > 1:
        listed = "; ".join(f"{name}: {fp}" for name, fp in sorted(known.items()))
        raise KeyMismatchError(
            f"{what}: inputs were pseudonymised with different keys ({listed}). Re-ingest them with one key "
            f"(${KEY_ENV} or the key file, see `slicefm key show`)"
        )
    return next(iter(known.values()), None)
