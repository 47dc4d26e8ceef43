"""Register the compiled pipeline in Kubeflow Pipelines and start runs of it (`slicefm pipeline submit`).

The pipeline (by name, in the namespace or shared) gets one version per git commit: `<short sha>`, or
`<short sha>-dirty-<8 hex>` when tracked files differ from HEAD (the hex: sha256 of `git diff HEAD`). A version
that exists is reused, never uploaded twice. Its description records the compiled spec's sha256, so a version of
the same name compiled with other settings (SLICEFM_IMAGE, ...) is refused instead of being run unnoticed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import re
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kfp
import kfp_server_api

log = logging.getLogger(__name__)
SPEC_MARK = "spec sha256:"
_SPEC_DIGEST = re.compile(re.escape(SPEC_MARK) + r"([0-9a-f]+)")
# filter.proto Predicate.Operation EQUALS (the number, as kfp.Client sends it).
_EQUALS = 1


@dataclass(frozen=True)
class Registered:
    """A pipeline version in Kubeflow Pipelines; `created` / `uploaded`: by this submit (else reused)."""

    pipeline_id: str
    version_id: str
    version_name: str
    created: bool
    uploaded: bool


# --- naming by the git commit ------------------------------------------------------------------------


def _git(checkout: Path, *args: str) -> bytes | None:
    """stdout of `git -C checkout args`; None when git is missing or fails (not a checkout)."""
    try:
        done = subprocess.run(
            ["git", "-C", str(checkout), *args], capture_output=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def head_commit(checkout: Path) -> str | None:
    """The full sha of HEAD; None outside git."""
    out = _git(checkout, "rev-parse", "--verify", "HEAD")
    return out.decode().strip() if out else None


def commit_version(checkout: Path) -> str | None:
    """The version name of the checkout: `<short sha>` (as the image tag), `<short sha>-dirty-<8 hex>` with
    uncommitted changes to tracked files (untracked files do not count); None outside git."""
    short = _git(checkout, "rev-parse", "--short", "HEAD")
    diff = _git(checkout, "diff", "HEAD", "--binary", "--no-color", "--no-ext-diff", "--no-textconv")
    if not short or diff is None:
        return None
    name = short.decode().strip()
    return f"{name}-dirty-{hashlib.sha256(diff).hexdigest()[:8]}" if diff else name


def spec_digest(package: Path) -> str:
    """First 16 hex digits of the compiled pipeline file's sha256."""
    return hashlib.sha256(package.read_bytes()).hexdigest()[:16]


def version_description(commit: str | None, digest: str) -> str:
    return f"git {commit or 'unknown'}; {SPEC_MARK}{digest}"


# --- Kubeflow Pipelines --------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """kfp.Client prints links of its own and warns about server versions: keep them to the debug log."""
    out = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(out):
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        if out.getvalue().strip():
            log.debug("kfp: %s", out.getvalue().strip())


def connect(host: str, token: str | None, namespace: str | None) -> kfp.Client:
    with quiet():
        return kfp.Client(host=host, existing_token=token, namespace=namespace)


def _named(name: str) -> str:
    """A list filter: display_name equals `name`."""
    return json.dumps({"predicates": [{"operation": _EQUALS, "key": "display_name", "stringValue": name}]})


def find_pipeline(client: kfp.Client, name: str, namespace: str | None) -> str | None:
    """The id of the pipeline called `name` in `namespace` (None: the shared pipelines), None when absent."""
    listed = client.list_pipelines(filter=_named(name), namespace=namespace, page_size=100).pipelines or []
    ids = [p.pipeline_id for p in listed if name in (p.display_name, p.name)]
    if len(ids) > 1:
        raise SystemExit(
            f"{len(ids)} pipelines are called {name!r} in Kubeflow Pipelines: delete all but one"
        )
    return ids[0] if ids else None


def ensure_pipeline(
    client: kfp.Client, name: str, namespace: str | None, description: str
) -> tuple[str, bool]:
    """The pipeline's id, created without a version when absent (an upload would add a version named after
    the pipeline besides the commits'); True when created here."""
    found = find_pipeline(client, name, namespace)
    if found:
        return found, False
    body = kfp_server_api.V2beta1Pipeline(display_name=name, description=description, namespace=namespace)
    with quiet():
        created = client.pipelines.pipeline_service_create_pipeline(pipeline=body)
    return created.pipeline_id, True


def find_version(client: kfp.Client, pipeline_id: str, name: str) -> Any | None:
    """The pipeline's version called `name` (a V2beta1PipelineVersion), None when absent."""
    listed = client.list_pipeline_versions(pipeline_id, filter=_named(name), page_size=100).pipeline_versions
    return next((v for v in listed or [] if name in (v.display_name, v.name)), None)


def ensure_version(
    client: kfp.Client, pipeline_id: str, package: Path, name: str, commit: str | None
) -> tuple[str, bool]:
    """The id of the version `name`: the existing one when its spec is this package's, else uploaded; True when
    uploaded here. Stops when a version of that name holds another spec."""
    digest = spec_digest(package)
    existing = find_version(client, pipeline_id, name)
    if existing is not None:
        found = _SPEC_DIGEST.search(existing.description or "")
        if found and found.group(1) != digest:
            raise SystemExit(
                f"pipeline version {name!r} exists with another compiled spec (sha256 {found.group(1)}, this one "
                f"{digest}): compile-time settings (SLICEFM_IMAGE, ...) or untracked files differ from the "
                "submit that uploaded it; name this version otherwise with --version-name / KFP_PIPELINE_VERSION"
            )
        return existing.pipeline_version_id, False
    with quiet():
        uploaded = client.upload_pipeline_version(
            str(package), name, pipeline_id=pipeline_id, description=version_description(commit, digest)
        )
    return uploaded.pipeline_version_id, True


def register(
    client: kfp.Client,
    package: Path,
    pipeline_name: str,
    version_name: str,
    namespace: str | None,
    commit: str | None,
    description: str = "",
) -> Registered:
    """The pipeline and its version `version_name` for the compiled `package`, each created only when absent."""
    pipeline_id, created = ensure_pipeline(client, pipeline_name, namespace, description)
    version_id, uploaded = ensure_version(client, pipeline_id, package, version_name, commit)
    return Registered(pipeline_id, version_id, version_name, created, uploaded)


def start_run(
    client: kfp.Client,
    version: Registered,
    experiment: str,
    namespace: str | None,
    run_name: str,
    params: dict[str, Any],
    service_account: str | None,
) -> str:
    """Start a run of the pipeline version in `experiment` (created when absent); its id."""
    with quiet():
        exp = client.create_experiment(experiment, namespace=namespace)
        run = client.run_pipeline(
            exp.experiment_id,
            run_name,
            params=params,
            pipeline_id=version.pipeline_id,
            version_id=version.version_id,
            service_account=service_account or None,
        )
    return run.run_id


@contextlib.contextmanager
def api_errors(host: str) -> Iterator[None]:
    """An HTTP error of the Kubeflow Pipelines API as a one-line SystemExit (status, reason, the server's text)."""
    try:
        yield
    except kfp_server_api.ApiException as err:
        body = " ".join(str(err.body or "").split())[:500]
        raise SystemExit(f"Kubeflow Pipelines at {host} answered {err.status} {err.reason}: {body}") from err


def pipeline_url(host: str, pipeline_id: str) -> str:
    return f"{host.rstrip('/')}/#/pipelines/details/{pipeline_id}"


def version_url(host: str, version: Registered) -> str:
    return f"{pipeline_url(host, version.pipeline_id)}/version/{version.version_id}"


def run_url(host: str, run_id: str) -> str:
    return f"{host.rstrip('/')}/#/runs/details/{run_id}"


def summary(
    host: str,
    pipeline_name: str,
    version: Registered,
    run_name: str,
    run_id: str,
    experiment: str,
    service_account: str | None,
) -> list[str]:
    """What a submit prints: the pipeline (when created), its version (uploaded or reused) and the run, with URLs."""
    lines = (
        [f"created pipeline {pipeline_name!r}: {pipeline_url(host, version.pipeline_id)}"]
        if version.created
        else []
    )
    state = "uploaded" if version.uploaded else "exists (submitted before), reused"
    lines.append(
        f"pipeline {pipeline_name!r} version {version.version_name!r} {state}: {version_url(host, version)}"
    )
    account = service_account or "the namespace's default"
    lines.append(
        f"submitted {run_name} (experiment {experiment!r}, service account {account}): {run_url(host, run_id)}"
    )
    return lines
