"""Registered models as verified files: MANIFEST.json, lineage, listing and `pull NAME[@ALIAS|:VERSION]`.

Every model slicefm registers carries a payload directory (weights, config json, `lineage.json`) plus a
`MANIFEST.json` with the sha256 and size of each payload file. The manifest's own sha256 is also stored
as a model version tag, i.e. in the registry database, which lives apart from the artifact store: a
pull therefore detects a corrupted or swapped file even when the manifest beside it was rewritten too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slicefm.core.store import replace_dir

logger = logging.getLogger(__name__)

MANIFEST_NAME = "MANIFEST.json"
LINEAGE_NAME = "lineage.json"
MANIFEST_FORMAT = 1
TAG_PREFIX = "slicefm."
MANIFEST_TAG = "slicefm.manifest_sha256"
PAYLOAD_TAG = "slicefm.payload_path"  # where the payload sits inside the MLflow model directory
KIND_TAG = "slicefm.kind"
_LINEAGE_KEY = re.compile(r"^[a-z][a-z0-9_]*$")
_CHUNK = 1024 * 1024
# MLflow's error codes for an unknown model/version (RESOURCE_DOES_NOT_EXIST) and alias (INVALID_PARAMETER_VALUE).
_NOT_FOUND_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


class ModelRegistryError(RuntimeError):
    """A registered model cannot be resolved (unknown name, version or alias)."""


class ModelIntegrityError(RuntimeError):
    """Downloaded model files do not match their MANIFEST.json (corrupted, tampered or incomplete)."""


@dataclass(frozen=True)
class ModelSpec:
    """`NAME` (latest version), `NAME@ALIAS` or `NAME:VERSION`."""

    name: str
    version: str | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.alias:
            return f"{self.name}@{self.alias}"
        return f"{self.name}:{self.version}" if self.version else self.name


@dataclass(frozen=True)
class ModelVersionInfo:
    """One registered model version as `slicefm models list` shows it."""

    name: str
    version: str
    aliases: tuple[str, ...]
    created_ms: int
    run_id: str | None
    kind: str | None
    lineage: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PulledModel:
    """Result of `pull_model`: where the verified files are and where they came from."""

    name: str
    version: str
    path: Path
    files: tuple[str, ...]
    lineage: dict[str, str]


# -- manifest -------------------------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _payload_files(root: Path) -> list[str]:
    """Every regular file under `root` except the manifest, as sorted posix paths relative to root."""
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME
    )


def write_manifest(root: Path) -> str:
    """Write `root/MANIFEST.json` (sha256 + size of every other file below root); returns its sha256."""
    files = [
        {"path": rel, "sha256": sha256_file(root / rel), "size": (root / rel).stat().st_size}
        for rel in _payload_files(root)
    ]
    text = json.dumps({"format_version": MANIFEST_FORMAT, "files": files}, indent=2, sort_keys=True) + "\n"
    (root / MANIFEST_NAME).write_text(text, encoding="utf-8")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def verify_manifest(root: Path, expected_sha256: str | None = None, label: str = "") -> list[str]:
    """Check every file under `root` against `root/MANIFEST.json`; returns the verified paths.

    Raises ModelIntegrityError naming each missing, changed or unlisted file (all of them, not just the
    first), or a manifest whose own hash differs from `expected_sha256` (the registry's record).
    """
    where = f"{label}: " if label else ""
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ModelIntegrityError(f"{where}{MANIFEST_NAME} missing; cannot verify the model files")
    raw = manifest_path.read_bytes()
    if expected_sha256 is not None and hashlib.sha256(raw).hexdigest() != expected_sha256:
        raise ModelIntegrityError(
            f"{where}{MANIFEST_NAME} differs from the one recorded in the registry at registration "
            f"(sha256 {hashlib.sha256(raw).hexdigest()[:12]}..., expected {expected_sha256[:12]}...)"
        )
    manifest = json.loads(raw)
    if manifest.get("format_version") != MANIFEST_FORMAT:
        raise ModelIntegrityError(
            f"{where}unsupported {MANIFEST_NAME} format {manifest.get('format_version')}"
        )
    listed = {entry["path"]: entry for entry in manifest["files"]}
    problems: list[str] = []
    for rel, entry in sorted(listed.items()):
        path = root / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
            continue
        size = path.stat().st_size
        if size != entry["size"]:
            problems.append(f"{rel}: size {size} bytes, expected {entry['size']}")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{rel}: sha256 mismatch (expected {entry['sha256'][:12]}...)")
    problems += [f"{rel}: not listed in {MANIFEST_NAME}" for rel in _payload_files(root) if rel not in listed]
    if problems:
        raise ModelIntegrityError(f"{where}model files fail verification: " + "; ".join(problems))
    return sorted(listed)


# -- lineage --------------------------------------------------------------------------------------------
def clean_lineage(lineage: Mapping[str, Any] | None) -> dict[str, str]:
    """Drop unknown (None/empty) items and check keys, so tags and lineage.json stay predictable."""
    out: dict[str, str] = {}
    for key, value in (lineage or {}).items():
        if not _LINEAGE_KEY.match(key):
            raise ValueError(f"lineage key {key!r} must match {_LINEAGE_KEY.pattern}")
        if value is not None and str(value) != "":
            out[key] = str(value)
    return out


def lineage_tags(lineage: Mapping[str, str]) -> dict[str, str]:
    """Model version tags for lineage items: `slicefm.<key>`."""
    return {f"{TAG_PREFIX}{k}": v for k, v in lineage.items()}


def edge_lineage(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Lineage the process environment knows (image reference and git commit baked into the image).

    Call this at the edge (CLI, KFP component) and pass the result down; the library itself never
    reads these variables.
    """
    env = os.environ if environ is None else environ
    return clean_lineage({"image": env.get("SLICEFM_IMAGE"), "git_commit": env.get("SLICEFM_GIT_COMMIT")})


# -- registry access ------------------------------------------------------------------------------------
def _client(tracking_uri: str | None) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def parse_spec(spec: str) -> ModelSpec:
    """`NAME`, `NAME@ALIAS` or `NAME:VERSION` -> ModelSpec; ValueError for anything else."""
    text = spec.strip()
    if "@" in text:
        name, _, alias = text.rpartition("@")
        if not name or not alias:
            raise ValueError(f"model spec {spec!r}: expected NAME@ALIAS")
        return ModelSpec(_check_name(name, spec), alias=alias)
    if ":" in text:
        name, _, version = text.rpartition(":")
        if not name or not version.isdigit() or int(version) < 1:
            raise ValueError(f"model spec {spec!r}: expected NAME:VERSION with a positive integer version")
        return ModelSpec(_check_name(name, spec), version=str(int(version)))
    return ModelSpec(_check_name(text, spec))


def _check_name(name: str, spec: str) -> str:
    if not name or "/" in name or "'" in name or '"' in name:
        raise ValueError(f"model spec {spec!r}: invalid model name {name!r}")
    return name


def _versions(client: Any, name: str) -> list[Any]:
    return list(client.search_model_versions(filter_string=f"name='{name}'"))


def resolve_version(spec: ModelSpec, tracking_uri: str | None = None) -> Any:
    """The MLflow ModelVersion a spec names (latest when bare); ModelRegistryError saying what exists."""
    from mlflow.exceptions import MlflowException

    client = _client(tracking_uri)
    try:
        if spec.alias:
            return client.get_model_version_by_alias(spec.name, spec.alias)
        if spec.version:
            return client.get_model_version(spec.name, spec.version)
        versions = _versions(client, spec.name)
    except MlflowException as exc:
        # Only "not found" answers are about the spec; anything else (server down, denied) propagates.
        if exc.error_code not in _NOT_FOUND_CODES:
            raise
        raise ModelRegistryError(_not_found(client, spec)) from exc
    if not versions:
        raise ModelRegistryError(f"no registered model named {spec.name!r} at {client.tracking_uri}")
    return max(versions, key=lambda mv: int(mv.version))


def _not_found(client: Any, spec: ModelSpec) -> str:
    """Explain a failed lookup with the versions/aliases that do exist, so a typo is obvious."""
    from mlflow.exceptions import MlflowException

    try:
        versions = sorted(_versions(client, spec.name), key=lambda mv: int(mv.version))
    except MlflowException:
        versions = []
    if not versions:
        return f"model {spec} not found: no registered model named {spec.name!r}"
    known = ", ".join(str(mv.version) for mv in versions)
    try:
        aliases = sorted(_aliases(client.get_registered_model(spec.name)))
    except MlflowException:
        aliases = []
    return f"model {spec} not found in the registry; {spec.name!r} has versions {known}" + (
        f" and aliases {', '.join(aliases)}" if aliases else ""
    )


def _lineage_of(tags: Mapping[str, str]) -> dict[str, str]:
    skip = {MANIFEST_TAG, PAYLOAD_TAG, KIND_TAG}
    return {k[len(TAG_PREFIX) :]: v for k, v in tags.items() if k.startswith(TAG_PREFIX) and k not in skip}


def list_models(tracking_uri: str | None = None) -> list[ModelVersionInfo]:
    """Every version of every registered model, by name then newest version first."""
    client = _client(tracking_uri)
    out: list[ModelVersionInfo] = []
    for rm in _all_registered_models(client):
        # Version search results carry no aliases on every store; the registered model has them all.
        by_version: dict[str, list[str]] = {}
        for alias, version in _aliases(rm).items():
            by_version.setdefault(str(version), []).append(alias)
        for mv in _versions(client, rm.name):
            tags = dict(mv.tags or {})
            out.append(
                ModelVersionInfo(
                    name=mv.name,
                    version=str(mv.version),
                    aliases=tuple(sorted(by_version.get(str(mv.version), []))),
                    created_ms=int(mv.creation_timestamp or 0),
                    run_id=mv.run_id or None,
                    kind=tags.get(KIND_TAG),
                    lineage=_lineage_of(tags),
                )
            )
    return sorted(out, key=lambda m: (m.name, -int(m.version)))


def _aliases(registered_model: Any) -> dict[str, str]:
    """{alias: version} of a RegisteredModel (a dict, or a list of RegisteredModelAlias objects)."""
    raw = registered_model.aliases or {}
    if isinstance(raw, Mapping):
        return {str(k): str(v) for k, v in raw.items()}
    return {str(a.alias): str(a.version) for a in raw}


def _all_registered_models(client: Any) -> Iterable[Any]:
    token = None
    while True:
        page = client.search_registered_models(max_results=100, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def set_alias(name: str, version: str | int, alias: str, tracking_uri: str | None = None) -> None:
    """Point `name@alias` at `version` (moves the alias if it pointed elsewhere)."""
    _client(tracking_uri).set_registered_model_alias(name, alias, str(version))
    logger.info("alias %s@%s -> version %s", name, alias, version)


# -- pull -----------------------------------------------------------------------------------------------
def pull_model(
    spec: str | ModelSpec, dest: str | Path, tracking_uri: str | None = None, *, overwrite: bool = False
) -> PulledModel:
    """Download a registered model's payload into `dest`, verified against its MANIFEST.json.

    Files land in a temp directory beside `dest` and are renamed into place only after every file
    checks out, so `dest` is either complete and verified or untouched. An existing `dest` is replaced
    only with `overwrite`.
    """
    import mlflow.artifacts

    spec = parse_spec(spec) if isinstance(spec, str) else spec
    dest = Path(dest).expanduser().absolute()
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} already exists; remove it or pull with overwrite (--force)")
    mv = resolve_version(spec, tracking_uri)
    label = f"{mv.name}:{mv.version}"
    tags = dict(mv.tags or {})
    payload = tags.get(PAYLOAD_TAG)
    if not payload:
        raise ModelIntegrityError(
            f"{label} has no {PAYLOAD_TAG} tag: it was not registered by slicefm with a manifest"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        # Pin the resolved version (not the alias), so a concurrent alias move cannot mix versions. The
        # location comes from our client: a models:/ URI would be resolved against MLflow's global
        # registry URI, ignoring `tracking_uri`.
        root = _client(tracking_uri).get_model_version_download_uri(mv.name, mv.version)
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"{root.rstrip('/')}/{payload}",
            dst_path=str(tmp / "download"),
            tracking_uri=tracking_uri,
        )
        files = verify_manifest(Path(local), tags.get(MANIFEST_TAG), label=label)
        _replace_dir(Path(local), dest, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("pulled %s (%s) -> %s, %d files verified", label, spec, dest, len(files))
    return PulledModel(mv.name, str(mv.version), dest, tuple(files), _lineage_of(tags))


def download_encoder(model_uri: str) -> str:
    """Download a registered encoder (`models:/NAME@ALIAS` or `models:/NAME/VERSION`, resolved against MLflow's
    current tracking URI) into a temp directory; return the directory holding its encoder.json."""
    import mlflow.artifacts

    from slicefm.models.export_format import META_KEY

    dest = tempfile.mkdtemp(prefix="slicefm-encoder-")
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=dest))
    hits = sorted(local.rglob(META_KEY))
    if not hits:
        raise FileNotFoundError(
            f"{model_uri}: no {META_KEY} in the registered model (is it a slicefm encoder?)"
        )
    return str(hits[0].parent)


def _replace_dir(src: Path, dest: Path, overwrite: bool) -> None:
    """`replace_dir`, refusing a `dest` that appeared meanwhile unless `overwrite`."""
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} appeared while pulling; not replacing it")
    replace_dir(src, dest)
