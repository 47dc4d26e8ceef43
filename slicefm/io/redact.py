"""Remove DICOM UIDs from text that names source files (paths in quarantine reports, logs, manifests).

PACS exports often name files and folders by SOPInstanceUID / SeriesInstanceUID, so a source path can
carry an identifier. Paths are kept readable; every UID-shaped component is replaced by a short keyed
digest (`uid-3fa2c1d0`) that the key holder can match against a listing of the source.
"""

from __future__ import annotations

import hashlib
import hmac
import re

# A DICOM UID: dot-separated numeric components, at least 5 (roots such as 1.2.840.10008 plus suffixes).
UID_PATTERN = re.compile(r"(?<![\d.])\d+(?:\.\d+){4,}(?![\d.]*\d)")


def redact_uids(text: str, key: bytes | None = None) -> str:
    """Replace UIDs in `text`: with `uid-<keyed digest>` when a key is given, else `<uid>`."""

    def sub(match: re.Match[str]) -> str:
        if key is None:
            return "<uid>"
        return "uid-" + hmac.new(key, match.group(0).encode(), hashlib.sha256).hexdigest()[:8]

    return UID_PATTERN.sub(sub, str(text))
