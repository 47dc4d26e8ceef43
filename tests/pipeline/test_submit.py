"""`slicefm pipeline submit` through the real kfp.Client against a fake Kubeflow Pipelines API server on
127.0.0.1 (tests/pipeline/fake_kfp.py): the pipeline is created once, a version per git commit is uploaded once
and reused, every submit starts a run of that version with its parameters and service account."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import kfp
import pytest

from pipelines import kfp_submit, runner
from slicefm.config import dump_config, load_config
from slicefm.edge.cli import main
from tests.pipeline.fake_kfp import API, FakeKfp

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "pipelines/configs/demo-cpu.yaml"
TRACKING = "http://mlflow.slicefm.svc.cluster.local:5000"
KFP_VARIABLES = (
    "KFP_HOST",
    "KFP_NAMESPACE",
    "KFP_EXPERIMENT",
    "KFP_TOKEN",
    "KFP_SERVICE_ACCOUNT",
    "KFP_PIPELINE_VERSION",
)


@pytest.fixture(autouse=True)
def cluster_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """What CI sets for a cluster run; no KFP_* settings and no kfp context file of the user's."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", TRACKING)
    monkeypatch.setenv("SLICEFM_STORE", "s3://bucket/slicefm")
    monkeypatch.setenv("SLICEFM_DATA_SOURCE", "/data/demo")
    for name in (*KFP_VARIABLES, "SLICEFM_EXTERNAL_SOURCE", "SLICEFM_PRETRAIN_SOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
        cwd=cwd, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return done.stdout.strip()


def submit(host: str, **kwargs: object) -> int:
    options = {"namespace": None, "experiment": "slicefm-ci", "token": None} | kwargs
    return runner.submit(CONFIG, host=host, **options)  # type: ignore[arg-type]


def test_submit_uploads_a_version_per_commit_and_reuses_it(tmp_path, capsys):
    with FakeKfp() as fake:
        assert submit(fake.url, service_account="pipeline-runner") == 0
        first = capsys.readouterr().out
        assert submit(fake.url) == 0
        second = capsys.readouterr().out

    # The version is named by the checkout's HEAD, whether or not the worktree has uncommitted changes.
    name = kfp_submit.commit_version(ROOT)
    short = git(ROOT, "rev-parse", "--short", "HEAD")
    assert name is not None and re.fullmatch(rf"{short}(-dirty-[0-9a-f]{{8}})?", name)
    # One pipeline (created without a version of its own), one version uploaded once: the compiled YAML.
    (pipeline,) = fake.pipelines.values()
    assert (pipeline["display_name"], pipeline["namespace"]) == ("slicefm", "")
    assert fake.count("POST", f"{API}/pipelines") == 1
    (upload,) = fake.uploads
    assert fake.count("POST", f"{API}/pipelines/upload_version") == 1
    assert upload.query["name"] == name and upload.query["pipelineid"] == pipeline["pipeline_id"]
    spec = upload.documents[0]
    assert spec["pipelineInfo"]["name"] == "slicefm"
    assert {"start-tracking", "exit-handler-1"} <= set(spec["root"]["dag"]["tasks"])
    assert {"config_yaml", "tracking_uri", "data_source"} <= set(
        spec["root"]["inputDefinitions"]["parameters"]
    )
    compiled = runner.compile_pipeline(tmp_path / "compiled.yaml")
    assert upload.data == compiled.read_bytes()
    digest = kfp_submit.spec_digest(compiled)
    assert upload.query["description"] == f"git {git(ROOT, 'rev-parse', 'HEAD')}; spec sha256:{digest}"
    (version_id,) = fake.versions
    reference = {"pipeline_id": pipeline["pipeline_id"], "pipeline_version_id": version_id}

    # Two runs of that version in one experiment, with the runtime parameters; no inline pipeline spec.
    (experiment,) = fake.experiments.values()
    assert experiment["display_name"] == "slicefm-ci"
    assert len(fake.runs) == 2
    for run in fake.runs:
        assert run["pipeline_version_reference"] == reference
        assert run["experiment_id"] == experiment["experiment_id"]
        assert "pipeline_spec" not in run
        params = run["runtime_config"]["parameters"]
        assert params["config_yaml"] == dump_config(load_config(CONFIG))
        assert params["tracking_uri"] == TRACKING
        assert (params["data_source"], params["store_uri"]) == ("/data/demo", "s3://bucket/slicefm")
        assert params["run_name"] == run["display_name"]
    assert fake.runs[0]["service_account"] == "pipeline-runner"
    assert "service_account" not in fake.runs[1]  # the namespace's default

    version_url = f"{fake.url}/#/pipelines/details/{pipeline['pipeline_id']}/version/{version_id}"
    assert first.splitlines() == [
        f"created pipeline 'slicefm': {fake.url}/#/pipelines/details/{pipeline['pipeline_id']}",
        f"pipeline 'slicefm' version '{name}' uploaded: {version_url}",
        f"submitted {fake.runs[0]['display_name']} (experiment 'slicefm-ci', service account pipeline-runner): "
        f"{fake.url}/#/runs/details/{fake.run_ids[0]}",
    ]
    assert second.splitlines() == [
        f"pipeline 'slicefm' version '{name}' exists (submitted before), reused: {version_url}",
        f"submitted {fake.runs[1]['display_name']} (experiment 'slicefm-ci', service account the namespace's "
        f"default): {fake.url}/#/runs/details/{fake.run_ids[1]}",
    ]


def test_cli_submit_reads_its_settings_from_the_environment(monkeypatch, capsys):
    """A multi-user cluster: the namespace's own pipeline (not the shared one of the same name), the version
    named by KFP_PIPELINE_VERSION, the run in KFP_EXPERIMENT under KFP_SERVICE_ACCOUNT; empty variables unset."""
    with FakeKfp(multi_user=True) as fake:
        shared = fake.add_pipeline("slicefm")
        for name, value in (("KFP_HOST", fake.url), ("KFP_NAMESPACE", "team-a"), ("KFP_EXPERIMENT", "nightly"),
                            ("KFP_PIPELINE_VERSION", "release-1"), ("KFP_SERVICE_ACCOUNT", "slicefm-runner")):  # fmt: skip
            monkeypatch.setenv(name, value)
        for unset_secret in ("KFP_TOKEN", "SLICEFM_DATA_SOURCE"):  # what CI sets for a secret that is not set
            monkeypatch.setenv(unset_secret, "")
        assert main(["pipeline", "submit", "--config", str(CONFIG)]) == 0

    (own,) = (p for p in fake.pipelines.values() if p["pipeline_id"] != shared)
    assert own["namespace"] == "team-a"
    (version,) = fake.versions.values()
    assert (version["pipeline_id"], version["display_name"]) == (own["pipeline_id"], "release-1")
    (experiment,) = fake.experiments.values()
    assert (experiment["display_name"], experiment["namespace"]) == ("nightly", "team-a")
    (run,) = fake.runs
    assert run["service_account"] == "slicefm-runner"
    assert run["runtime_config"]["parameters"]["data_source"] == load_config(CONFIG).data.source
    listed = [q for m, p, q in fake.requests if (m, p) == ("GET", f"{API}/pipelines")]
    assert listed and all(q["namespace"] == ["team-a"] for q in listed)
    assert "version 'release-1' uploaded" in capsys.readouterr().out


def test_an_existing_version_is_reused_unless_it_holds_another_spec(capsys):
    with FakeKfp() as fake:
        pipeline_id = fake.add_pipeline("slicefm")
        fake.add_version(pipeline_id, "v1", description="git 0123abc; spec sha256:0123456789abcdef")
        manual = fake.add_version(pipeline_id, "by-hand")  # uploaded in the UI: no spec digest to compare
        with pytest.raises(SystemExit, match="'v1' exists with another compiled spec .*--version-name"):
            submit(fake.url, version_name="v1")
        assert fake.runs == []
        assert submit(fake.url, version_name="by-hand") == 0
    assert fake.uploads == []
    (run,) = fake.runs
    assert run["pipeline_version_reference"] == {"pipeline_id": pipeline_id, "pipeline_version_id": manual}
    assert "version 'by-hand' exists (submitted before), reused" in capsys.readouterr().out


def test_an_api_error_stops_with_the_server_answer():
    with FakeKfp(fail={f"POST {API}/runs": 403}) as fake:
        with pytest.raises(
            SystemExit, match=rf"Kubeflow Pipelines at {fake.url} answered 403 .*refused by the test"
        ):
            submit(fake.url, service_account="not-allowed")


def test_submit_requires_a_tracking_uri_and_a_version_name(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(SystemExit, match="set MLFLOW_TRACKING_URI"):
        submit("http://127.0.0.1:9")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", TRACKING)
    monkeypatch.setattr(runner, "ROOT", tmp_path)  # a copy of the project without git
    with pytest.raises(SystemExit, match="not a git checkout: name the pipeline version with --version-name"):
        submit("http://127.0.0.1:9")


def test_commit_version_names_head_and_uncommitted_changes(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    git(repo, "add", "a.py")
    git(repo, "commit", "-q", "-m", "one")
    short = git(repo, "rev-parse", "--short", "HEAD")
    assert kfp_submit.commit_version(repo) == short
    assert kfp_submit.head_commit(repo) == git(repo, "rev-parse", "HEAD")
    (repo / "untracked.txt").write_text("not part of the version\n")
    assert kfp_submit.commit_version(repo) == short

    (repo / "a.py").write_text("x = 2\n")
    dirty = kfp_submit.commit_version(repo)
    assert dirty is not None and re.fullmatch(rf"{short}-dirty-[0-9a-f]{{8}}", dirty)
    assert kfp_submit.commit_version(repo) == dirty  # the same changes, the same name
    git(repo, "add", "a.py")
    assert kfp_submit.commit_version(repo) == dirty  # staged or not
    (repo / "a.py").write_text("x = 3\n")
    assert kfp_submit.commit_version(repo) not in (short, dirty)

    (tmp_path / "plain").mkdir()
    assert kfp_submit.commit_version(tmp_path / "plain") is None
    assert kfp_submit.head_commit(tmp_path / "plain") is None
