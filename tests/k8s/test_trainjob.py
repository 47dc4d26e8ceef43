"""The TrainJob launcher: manifests valid against the Kubeflow Trainer v2.3.0 API models; the release check of
the cluster's CRD, strict creation, submit / wait / failure / timeout / cleanup through the real kubernetes
client against a fake API server on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import kubernetes.client as kc
import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from slicefm.edge.trainjob import (
    CONFIG_DIR,
    CONFIG_ENV,
    CONFIG_PATH,
    CRD_NAME,
    JOBSET_NAME_LABEL,
    MAX_NAME,
    NAME_RE,
    Terminated,
    TrainerAPIMismatch,
    TrainJobConfig,
    TrainJobFailed,
    TrainJobTimeout,
    build_trainjob,
    run_trainjob,
    submit_and_wait,
    trainjob_name,
)
from tests.k8s.fake_apiserver import FakeKube, condition, container_status, jobs_status, pod
from tests.k8s.schema_check import ROOT, model_errors, pod_patch, trainjob_errors
from tests.k8s.trainer_crd import trainjob_crd

PRE = "s3://bucket/runs/run-1/preprocess"
OUT = "s3://bucket/runs/run-1/pretrain"
CONFIG = "pretrain:\n  method: moco\n  steps: 10\n"
NAME = "run-1-pretrain"
GPU_TAINT = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}

RUNNING = {
    "conditions": [condition("Created", reason="JobsCreationSucceeded")],
    "jobsStatus": jobs_status(2, 2),
}
COMPLETE = {
    "conditions": [
        condition("Created"),
        condition("Complete", reason="AllJobsCompleted", message="jobset completed"),
    ],
    "jobsStatus": jobs_status(succeeded=1),
}
FAILED = {
    "conditions": [
        condition("Created"),
        condition("Failed", reason="FailedJobs", message="jobset failed: job node-0 has failed"),
    ],
    "jobsStatus": jobs_status(failed=1),
}


def _cfg(**kw) -> TrainJobConfig:
    base = {"num_nodes": 2, "gpus_per_node": 8, "poll_s": 0.01, "timeout_s": 10, "log_lines": 3}
    return TrainJobConfig.model_validate({**base, **kw})


def _manifest(cfg: TrainJobConfig | None = None, name: str = NAME) -> dict:
    return build_trainjob(cfg or _cfg(), name, PRE, OUT, CONFIG)


def _apis(fake: FakeKube) -> tuple[kc.CustomObjectsApi, kc.CoreV1Api]:
    conf = kc.Configuration(host=fake.url)
    api_client = kc.ApiClient(conf)
    return kc.CustomObjectsApi(api_client), kc.CoreV1Api(api_client)


def _wait(fake: FakeKube, **kw):
    api, core = _apis(fake)
    opts = {"timeout_s": 10, "poll_s": 0.01, "cleanup": True, "log_lines": 3, **kw}
    return submit_and_wait(api, _manifest(), core=core, **opts)


# --- manifest ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {
            "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
            "tolerations": [GPU_TAINT],
        },
        {"gpus_per_node": 0, "num_nodes": 3, "cpu_per_node": "", "memory_per_node": "", "mlflow_secret": ""},
        {
            "accelerator": "amd.com/gpu",
            "image_pull_secrets": ["regcred"],
            "service_account": "",
            "s3_secret": "",
        },
        {
            "tolerations": [
                {
                    "key": "sku",
                    "operator": "Equal",
                    "value": "gpu",
                    "effect": "NoExecute",
                    "tolerationSeconds": 30,
                }
            ],
            "tracking_uri": "http://mlflow.slicefm:5000",
        },
    ],
)
def test_built_manifest_validates_against_the_trainer_api_models(settings):
    cfg = _cfg(**settings)
    job = _manifest(cfg)
    assert trainjob_errors(job) == []
    assert pod_setting_problems(job, cfg) == []
    trainer = job["spec"]["trainer"]
    assert trainer["numNodes"] == cfg.num_nodes
    assert trainer["numProcPerNode"] == (cfg.gpus_per_node or 1)
    assert "torchrun -m slicefm pretrain-worker" in trainer["command"][2]
    assert trainer["args"][:4] == ["--preprocessed", PRE, "--out", OUT]
    assert {"name": CONFIG_ENV, "value": CONFIG} in trainer["env"]
    resources = trainer.get("resourcesPerNode", {})
    if cfg.gpus_per_node:
        assert resources["limits"][cfg.accelerator] == str(cfg.gpus_per_node)
    else:
        assert not any("gpu" in k for part in resources.values() for k in part)
    assert bool(resources) == bool(cfg.gpus_per_node or cfg.cpu_per_node or cfg.memory_per_node)
    assert job["spec"]["runtimeRef"]["name"] == "torch-distributed"
    assert [p["manager"] for p in job["spec"]["runtimePatches"]] == ["slicefm/launcher"]


def pod_setting_problems(job: dict, cfg: TrainJobConfig) -> list[str]:
    """What the `node` pods of the built job would lack of cfg: scheduling, /dev/shm, identity."""
    try:
        pod = pod_patch(job)
    except (KeyError, ValueError) as exc:
        return [f"no runtime patch of the node pods ({exc!r})"]
    problems = []
    expected = {
        "tolerations": [t.manifest() for t in cfg.tolerations] or None,
        "nodeSelector": cfg.node_selector or None,
        "serviceAccountName": cfg.service_account or None,
        "imagePullSecrets": [{"name": s} for s in cfg.image_pull_secrets] or None,
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": cfg.shm_size}}],
        "containers": [{"name": "node", "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}],
    }
    for key, value in expected.items():
        if pod.get(key) != value:
            problems.append(f"{key}: {pod.get(key)!r}, expected {value!r}")
    return problems


@pytest.mark.parametrize(
    "breakage",
    ["tolerations", "nodeSelector", "volumes", "containers", "sizeLimit", "runtimePatches"],
)
def test_a_manifest_missing_pod_settings_fails(breakage):
    """The check above and the API validation see a manifest that lost its tolerations, node selector or
    /dev/shm (what a v2.3 API server did to the v2.1 manifest: the pods stayed Pending)."""
    cfg = _cfg(node_selector={"pool": "h100"}, tolerations=[GPU_TAINT])
    job = _manifest(cfg)
    assert pod_setting_problems(job, cfg) == []
    if breakage == "sizeLimit":
        del pod_patch(job)["volumes"][0]["emptyDir"]["sizeLimit"]
    elif breakage == "runtimePatches":
        job["spec"]["podTemplateOverrides"] = [{"targetJobs": [{"name": "node"}], "spec": pod_patch(job)}]
        del job["spec"]["runtimePatches"]
        assert "spec.podTemplateOverrides: unknown field" in trainjob_errors(job)
    else:
        del pod_patch(job)[breakage]
    assert pod_setting_problems(job, cfg)


def test_a_field_the_api_does_not_have_fails_at_build_time(monkeypatch):
    """The generated models drop unknown fields silently; the launcher builds them with extra="forbid"."""
    from kubeflow_trainer_api import models as api
    from pydantic import ValidationError

    from slicefm.edge import trainjob

    assert api.TrainerV1alpha1PodSpecPatch(node_selectr={"a": "b"}).to_dict() == {}, "what it guards against"
    with pytest.raises(ValidationError, match="node_selectr"):
        trainjob._api(api.TrainerV1alpha1PodSpecPatch, node_selectr={"a": "b"})
    with pytest.raises(ValidationError, match="pod_template_overrides"):  # the v2.1 field
        trainjob._api(api.TrainerV1alpha1TrainJobSpec, runtime_ref=None, pod_template_overrides=[])
    with pytest.raises(ValidationError, match="numProcPerNode|num_proc_per_node"):
        trainjob._api(api.TrainerV1alpha1Trainer, num_proc_per_node="auto")  # an int since v2.2

    def typo(cfg: TrainJobConfig) -> api.TrainerV1alpha1PodSpecPatch:
        return trainjob._api(api.TrainerV1alpha1PodSpecPatch, tolerationz=[])

    monkeypatch.setattr(trainjob, "_pod_patch", typo)
    with pytest.raises(ValidationError, match="tolerationz"):
        _manifest()


def test_pods_log_into_the_stage_run_only_when_tracked():
    def env(cfg, run_id):
        return {
            e["name"]: e.get("value")
            for e in build_trainjob(cfg, NAME, PRE, OUT, CONFIG, run_id)["spec"]["trainer"]["env"]
        }

    tracked = _cfg(tracking_uri="http://mlflow.slicefm:5000")
    assert env(tracked, "abc123")["MLFLOW_RUN_ID"] == "abc123"
    assert env(tracked, "abc123")["MLFLOW_TRACKING_URI"] == "http://mlflow.slicefm:5000"
    assert "MLFLOW_RUN_ID" not in env(tracked, None)
    assert "MLFLOW_RUN_ID" not in env(_cfg(), "abc123")  # no tracking URI in the pods: nowhere to log


def test_bad_launcher_input_is_rejected_early():
    with pytest.raises(ValueError, match="DNS label"):
        _manifest(name="Run_1")
    with pytest.raises(ValueError, match="DNS label"):
        _manifest(name="a" * (MAX_NAME + 1))
    with pytest.raises(ValueError, match="s3://"):
        build_trainjob(_cfg(), NAME, "/local/preprocess", OUT, CONFIG)
    with pytest.raises(ValueError, match="num_node"):
        TrainJobConfig.model_validate({"num_node": 2})
    with pytest.raises(ValueError, match="Exists"):
        _cfg(tolerations=[{**GPU_TAINT, "value": "x"}])
    with pytest.raises(ValueError):
        _cfg(num_nodes=0)


@pytest.mark.parametrize(
    "run_name", ["slicefm-20260101-120000", "CLEAR ViT-B/16 (run 7)", "2026-run", "x" * 200, "---"]
)
def test_trainjob_names_are_valid_and_stable(run_name):
    name = trainjob_name(run_name)
    assert NAME_RE.match(name) and len(name) <= MAX_NAME, name
    assert trainjob_name(run_name) == name
    assert trainjob_errors(_manifest(name=name)) == []
    assert trainjob_name("x" * 200) != trainjob_name("x" * 199)


def test_launch_script_writes_the_config_and_hands_over_to_torchrun(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text('#!/bin/sh\necho "torchrun $*"\ncat "$5$6$7$8$9" 2>/dev/null || true\n')
    (bin_dir / "torchrun").chmod(0o755)
    trainer = _manifest()["spec"]["trainer"]
    script = trainer["command"][2].replace(CONFIG_DIR, str(tmp_path / "cfg"))
    args = [a.replace(CONFIG_DIR, str(tmp_path / "cfg")) for a in trainer["args"]]
    tricky = 'pretrain:\n  note: "$HOME `id` $(id)"\n'
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", CONFIG_ENV: tricky}
    out = subprocess.run(
        [*trainer["command"][:2], script, *trainer["command"][3:], *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.startswith(f"torchrun -m slicefm pretrain-worker --preprocessed {PRE} --out {OUT} --config ")
    assert (tmp_path / "cfg" / "config.yaml").read_text() == tricky + "\n"


# --- submit / wait / cleanup --------------------------------------------------------------------------


def test_completed_job_is_returned_and_deleted():
    with FakeKube([None, RUNNING, RUNNING, COMPLETE]) as fake:
        obj = _wait(fake)
    assert fake.created == [_manifest()]
    assert obj["spec"] == _manifest()["spec"], "the server dropped nothing"
    assert trainjob_errors(fake.created[0]) == []
    assert trainjob_errors(obj) == [], "the fake's objects follow the API models too"
    assert obj["status"]["conditions"][-1]["type"] == "Complete"
    assert fake.count("GET", r"/trainjobs/run-1-pretrain$") == 4
    assert fake.deleted == [NAME]


def test_cleanup_can_be_switched_off():
    with FakeKube([COMPLETE]) as fake:
        _wait(fake, cleanup=False)
    assert fake.deleted == [] and fake.count("DELETE", "trainjobs") == 0


def test_failed_job_names_failed_pods_reasons_and_last_log_lines():
    logs = (
        "\n".join(f"step {i} loss 1.{i}" for i in range(1, 8))
        + "\ntorch.OutOfMemoryError: CUDA out of memory"
    )
    pods = [
        pod(f"{NAME}-node-0-0-abcde", NAME, "Failed", [container_status(terminated=("OOMKilled", 137))]),
        pod(f"{NAME}-node-0-1-fghij", NAME, "Running", [container_status(running=True)]),
        pod("other-node-0-0-zzzzz", "other", "Failed", [container_status(terminated=("Error", 1))]),
    ]
    for p in pods:
        assert model_errors(p, "V1Pod") == [], "the fake pods are real Pod objects"
    with FakeKube([RUNNING, FAILED], pods=pods, logs={f"{NAME}-node-0-0-abcde/node": logs}) as fake:
        with pytest.raises(TrainJobFailed) as info:
            _wait(fake)
    err = info.value
    msg = str(err)
    assert f"TrainJob slicefm/{NAME} failed: FailedJobs: jobset failed" in msg
    assert f"{NAME}-node-0-0-abcde (Failed): container node OOMKilled, exit code 137" in msg
    assert "| step 6 loss 1.6" in msg and "| torch.OutOfMemoryError: CUDA out of memory" in msg
    assert "step 5 loss" not in msg, "only the last log_lines lines"
    assert "fghij" not in msg and "other-node" not in msg
    assert [p.name for p in err.pods] == [f"{NAME}-node-0-0-abcde"]
    ((_, _, query),) = [r for r in fake.requests if r[1].endswith("/log")]
    assert query["container"] == ["node"] and query["tailLines"] == ["3"] and "previous" not in query
    ((_, _, query),) = [r for r in fake.requests if r[1].endswith("/pods")]
    assert query["labelSelector"] == [f"{JOBSET_NAME_LABEL}={NAME}"]
    assert fake.deleted == [NAME], "cleanup after the diagnosis"


def test_crash_looping_pod_shows_the_previous_run_logs():
    status = container_status(
        waiting=("CrashLoopBackOff", "back-off 5m0s"), last_terminated=("Error", 1), restarts=4
    )
    pods = [pod(f"{NAME}-node-0-0-aaaaa", NAME, "Running", [status])]
    logs = {
        f"{NAME}-node-0-0-aaaaa/node/previous": "Traceback (most recent call last):\nKeyError: 'pretrain'"
    }
    with FakeKube([FAILED], pods=pods, logs=logs) as fake:
        with pytest.raises(TrainJobFailed) as info:
            _wait(fake)
    msg = str(info.value)
    assert "container node CrashLoopBackOff (back-off 5m0s), exit code 1" in msg
    assert "| KeyError: 'pretrain'" in msg
    ((_, _, query),) = [r for r in fake.requests if r[1].endswith("/log")]
    assert query["previous"][0].lower() == "true"


def test_timeout_explains_pending_pods_and_deletes_the_job(requested_sleeps):
    unschedulable = condition(
        "PodScheduled", "False", "Unschedulable", "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    )
    unschedulable.pop("lastTransitionTime")
    pods = [pod(f"{NAME}-node-0-{i}-p", NAME, "Pending", conditions=[unschedulable]) for i in range(2)]
    pending = {"conditions": [condition("Created")], "jobsStatus": jobs_status(active=1)}
    with FakeKube([pending], pods=pods) as fake:
        with pytest.raises(TrainJobTimeout) as info:
            _wait(fake, timeout_s=0.3, poll_s=0.05, sleep=time.sleep)  # the recording sleep
    assert requested_sleeps and max(requested_sleeps) <= 0.05  # polls at poll_s, never a longer wait
    msg = str(info.value)
    assert "did not finish within 0.3 s" in msg
    assert "(Pending): Unschedulable: 0/4 nodes are available: 4 Insufficient nvidia.com/gpu." in msg
    assert isinstance(info.value, TrainJobFailed)
    assert fake.deleted == [NAME]
    assert fake.count("GET", "/log$") == 0, "no logs to read from pods that never started"


def test_sigterm_deletes_the_job_even_without_cleanup():
    """A cancelled pipeline run SIGTERMs the step: the TrainJob must not keep the GPUs busy."""
    before = signal.getsignal(signal.SIGTERM)
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM))
    with FakeKube([RUNNING]) as fake, pytest.raises(Terminated):
        timer.start()
        _wait(fake, cleanup=False, timeout_s=30, poll_s=0.02)
    timer.join()
    assert fake.deleted == [NAME]
    assert signal.getsignal(signal.SIGTERM) is before


def test_transient_api_errors_are_retried():
    with FakeKube([RUNNING, COMPLETE], errors=[503, 500]) as fake:
        obj = _wait(fake)
    assert obj["status"]["conditions"][-1]["type"] == "Complete"
    assert fake.count("GET", r"/trainjobs/") == 4


def test_an_existing_job_of_the_same_run_is_followed_not_duplicated():
    existing = {**_manifest(), "metadata": {**_manifest()["metadata"], "uid": "uid-0"}}
    with FakeKube([COMPLETE], preexisting=existing) as fake:
        _wait(fake)
    assert fake.created == [] and fake.count("POST", "trainjobs") == 1
    assert fake.deleted == [NAME]


def test_forbidden_create_raises_and_deletes_nothing():
    with FakeKube([COMPLETE], forbid_create=True) as fake:
        with pytest.raises(ApiException) as info:
            _wait(fake)
    assert info.value.status == 403
    assert fake.count("DELETE", "") == 0


def test_failure_is_still_explained_without_access_to_pods():
    with FakeKube([FAILED], forbid_pods=True) as fake:
        with pytest.raises(TrainJobFailed) as info:
            _wait(fake)
    msg = str(info.value)
    assert "failed: FailedJobs" in msg and "could not list pods: HTTP 403" in msg


def test_failed_job_without_pods_says_so():
    with (
        FakeKube([FAILED]) as fake,
        pytest.raises(TrainJobFailed, match=f"no pods found with label {JOBSET_NAME_LABEL}={NAME}"),
    ):
        _wait(fake)


def test_a_vanished_job_is_a_failure():
    with FakeKube([RUNNING], vanish_after=1) as fake, pytest.raises(TrainJobFailed, match="disappeared"):
        _wait(fake)


# --- the cluster's Trainer release and strict creation ------------------------------------------------


def test_the_crd_is_checked_before_a_strict_create():
    with FakeKube([COMPLETE]) as fake:
        _wait(fake)
    methods = [(m, p) for m, p, _ in fake.requests]
    crd_get = methods.index(("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/" + CRD_NAME))
    ((post, query),) = [(i, q) for i, (m, _, q) in enumerate(fake.requests) if m == "POST"]
    assert crd_get < post
    assert query["fieldValidation"] == ["Strict"]


V21_MANIFEST_SPEC = {
    "runtimeRef": {"name": "torch-distributed"},
    "podTemplateOverrides": [{"targetJobs": [{"name": "node"}], "spec": {"tolerations": [GPU_TAINT]}}],
}


def test_strict_creation_refuses_what_the_api_would_drop():
    """The v2.1 manifest on a v2.3 cluster: without strict validation the server keeps the job and drops
    the pod settings (the pods sit Pending); under Strict it refuses the job, naming the field."""
    old = {**_manifest(name="old-style"), "spec": V21_MANIFEST_SPEC}
    with FakeKube([RUNNING]) as fake:
        api, core = _apis(fake)
        api.create_namespaced_custom_object("trainer.kubeflow.org", "v1alpha1", "slicefm", "trainjobs", old)
        assert "podTemplateOverrides" not in fake.stored("slicefm", "old-style")["spec"], "silently dropped"
        with pytest.raises(TrainerAPIMismatch) as info:
            submit_and_wait(api, {**_manifest(), "spec": V21_MANIFEST_SPEC}, core=core, poll_s=0.01)
    assert 'strict decoding error: unknown field "spec.podTemplateOverrides"' in str(info.value)
    assert isinstance(info.value.__cause__, ApiException) and info.value.__cause__.status == 400
    assert [b["metadata"]["name"] for b in fake.created] == ["old-style"]
    assert fake.deleted == [], "nothing was created, nothing to delete"


@pytest.mark.parametrize(
    ("crd", "expected"),
    [
        (None, f"no TrainJob CRD ({CRD_NAME}) in the cluster"),
        (trainjob_crd("v2.1"), "its TrainJob spec is the one of release v2.1"),
        (trainjob_crd("v2.2"), "its TrainJob spec is the one of release v2.2"),
        (
            trainjob_crd("v2.3", labels={"app.kubernetes.io/version": "v2.2.1"}),
            "the CRD declares release v2.2.1",
        ),
        (trainjob_crd("v2.3", served=("v2alpha1",)), "trainer.kubeflow.org/v1alpha1 is not served"),
    ],
    ids=["not-installed", "v2.1", "v2.2", "declared-v2.2", "v1alpha1-not-served"],
)
def test_a_trainer_release_mismatch_is_a_clear_error_before_anything_is_created(crd, expected):
    with FakeKube([COMPLETE], crd=crd) as fake, pytest.raises(TrainerAPIMismatch) as info:
        _wait(fake)
    msg = str(info.value)
    assert expected in msg and "slicefm needs Kubeflow Trainer v2.3.0" in msg, msg
    assert fake.count("POST", "") == 0 and fake.deleted == []


@pytest.mark.parametrize(
    "labels", [{}, {"helm.sh/chart": "kubeflow-trainer-2.3.0"}, {"app.kubernetes.io/version": "2.3.1"}]
)
def test_a_v23_crd_passes_the_check(labels):
    from slicefm.edge.trainjob import installed_trainer, trainer_problems

    found = installed_trainer(trainjob_crd("v2.3", labels=labels))
    assert trainer_problems(found) == [] and found.shape == "v2.3"
    assert found.declared == (None if not labels else "v" + list(labels.values())[0].rsplit("-", 1)[-1])


def test_without_rbac_for_the_crd_the_job_still_runs_under_strict_validation(caplog):
    with FakeKube([COMPLETE], forbid_crd=True) as fake:
        _wait(fake)
    assert f"cannot read CRD {CRD_NAME} (HTTP 403" in caplog.text
    ((_, _, query),) = [r for r in fake.requests if r[0] == "POST"]
    assert query["fieldValidation"] == ["Strict"] and fake.deleted == [NAME]


# --- kubeconfig, run_trainjob and the KFP component ---------------------------------------------------


@pytest.fixture
def kubeconfig(tmp_path, monkeypatch):
    """Point the kubeconfig at a fake API server; out of cluster (no service-account environment)."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(kc.Configuration, "_default", None)  # load_kube_config sets a global default

    def write(url: str) -> Path:
        path = tmp_path / "kubeconfig"
        path.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "fake", "cluster": {"server": url}}],
                    "users": [{"name": "me", "user": {"token": "t0ken"}}],
                    "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "me"}}],
                    "current-context": "fake",
                }
            )
        )
        monkeypatch.setenv("KUBECONFIG", str(path))
        return path

    return write


def test_run_trainjob_uses_the_kubeconfig_out_of_cluster(kubeconfig):
    with FakeKube([RUNNING, COMPLETE]) as fake:
        kubeconfig(fake.url)
        obj = run_trainjob(_cfg(), name=NAME, preprocessed_uri=PRE, out_uri=OUT, config_yaml=CONFIG)
    assert obj["metadata"]["name"] == NAME and fake.deleted == [NAME]


def test_component_submits_the_trainjob_and_records_the_encoder(kubeconfig, tmp_path):
    from kfp import dsl

    from components.launch_trainjob import launch_trainjob
    from slicefm.config import PipelineConfig, dump_config

    config_yaml = dump_config(PipelineConfig())
    slices = dsl.Dataset(name="slices", uri=str(tmp_path / "slices"), metadata={"uri": PRE})
    encoder = dsl.Model(name="encoder", uri=str(tmp_path / "encoder"), metadata={})
    with FakeKube([COMPLETE]) as fake:
        kubeconfig(fake.url)
        name = launch_trainjob.python_func(
            config_yaml=config_yaml,
            store_uri="s3://bucket/runs/",
            run_name="run-1",
            slices=slices,
            encoder=encoder,
            num_nodes=4,
            gpus_per_node=8,
            node_selector={"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
            tolerations=[GPU_TAINT],
            poll_s=1,
        )
    assert name == NAME
    (job,) = fake.created
    assert trainjob_errors(job) == []
    assert job["spec"]["trainer"]["args"][:4] == ["--preprocessed", PRE, "--out", OUT]
    assert job["spec"]["trainer"]["numNodes"] == 4
    assert pod_patch(job)["tolerations"] == [GPU_TAINT]
    assert pod_patch(job)["volumes"][0]["emptyDir"]["sizeLimit"] == "16Gi"
    ((_, _, query),) = [r for r in fake.requests if r[0] == "POST"]
    assert query["fieldValidation"] == ["Strict"]
    assert encoder.metadata["uri"] == OUT and encoder.metadata["trainjob"] == NAME
    assert encoder.metadata["method"] == PipelineConfig().pretrain.method
    with pytest.raises(ValueError, match="store_uri"):
        launch_trainjob.python_func(
            config_yaml=config_yaml, store_uri="", run_name="r", slices=slices, encoder=encoder
        )


# --- the launcher's MLflow stage run and encoder registration -----------------------------------------


@pytest.fixture
def tracked_parent(tmp_path, monkeypatch) -> tuple[str, str]:
    """A sqlite MLflow store with an open pipeline parent run: (tracking URI, parent run id)."""
    from slicefm.edge.tracking.mlflow_runs import start_pipeline_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return tracking, start_pipeline_run(tracking, "trainjob-test", "run-1", {})


def _copy_to_s3(local_uri: str, s3_uri: str) -> str:
    from slicefm.core.store import open_store

    src, dst = open_store(local_uri), open_store(s3_uri)
    for key in src.list():
        dst.upload_file(src.local_path(key), key)
    return dst.uri("")


def _pods(workdir: Path) -> Callable[[dict], None]:
    """What a created TrainJob's pod does: `slicefm pretrain-worker` with its args, in its own process with the
    manifest's plain env values (config, MLFLOW_TRACKING_URI, MLFLOW_RUN_ID) over this environment (the
    secrets' AWS_* values are the test's own)."""

    def run(manifest: dict) -> None:
        trainer = manifest["spec"]["trainer"]
        env = {**os.environ, **{e["name"]: e["value"] for e in trainer["env"] if "value" in e}}
        config = workdir / "config.yaml"
        config.write_text(env[CONFIG_ENV])
        args = [str(config) if a == CONFIG_PATH else a for a in trainer["args"]]
        done = subprocess.run(
            [sys.executable, "-m", "slicefm", "pretrain-worker", *args],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]

    return run


def _launch(kubeconfig, tmp_path, fake: FakeKube, config_yaml: str, pre: str, store: str, tracked) -> str:
    from kfp import dsl

    from components.launch_trainjob import launch_trainjob

    kubeconfig(fake.url)
    return launch_trainjob.python_func(
        config_yaml=config_yaml,
        store_uri=store,
        run_name="run-1",
        slices=dsl.Dataset(name="slices", uri=str(tmp_path / "slices"), metadata={"uri": pre}),
        encoder=dsl.Model(name="encoder", uri=str(tmp_path / "encoder"), metadata={}),
        tracking_uri=tracked[0],
        parent_run_id=tracked[1],
        num_nodes=2,
        gpus_per_node=0,
        poll_s=0.01,
    )


def test_component_tracks_the_trainjob_and_registers_the_encoder_it_wrote(
    kubeconfig, tmp_path, s3_env, preprocessed, tracked_parent
):
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    from slicefm.config import PipelineConfig, dump_config
    from slicefm.core.store import open_store
    from slicefm.edge.tracking.models import pull_model
    from slicefm.edge.tracking.pipeline_runs import child_runs
    from tests.train.conftest import tiny_config

    tracking, parent_id = tracked_parent
    cfg = PipelineConfig.model_validate({"name": "mn", "pretrain": tiny_config("moco", steps=2).model_dump()})
    store = f"{s3_env}/runs"
    pre = _copy_to_s3(preprocessed, f"{store}/run-1/preprocess")
    out = f"{store}/run-1/pretrain"
    with FakeKube([RUNNING, COMPLETE], on_create=_pods(tmp_path)) as fake:
        assert _launch(kubeconfig, tmp_path, fake, dump_config(cfg), pre, store, tracked_parent) == NAME
    assert fake.deleted == [NAME]

    (run,) = child_runs(tracking, parent_id)
    tags = run.data.tags
    assert run.info.status == "FINISHED"
    assert tags["slicefm.stage"] == "pretrain" and tags["slicefm.launcher"] == "trainjob"
    assert tags["slicefm.trainjob.name"] == NAME and tags["slicefm.trainjob.num_nodes"] == "2"
    assert tags["slicefm.output_uri"] == out
    assert run.data.metrics["steps"] == 2 and "loss_last" in run.data.metrics
    # The pod's rank 0 logged its training curve into this stage run (MLFLOW_RUN_ID in the manifest).
    client = MlflowClient(tracking)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [2]
    assert {"lr", "slices_per_s", "eff_rank"} <= set(run.data.metrics)
    assert run.data.params["method"] == "moco"
    # The encoder the job wrote to S3 is the registered version, logged under this stage run.
    assert tags["slicefm.registered_model"] == "mn-encoder"
    mv = MlflowClient(tracking).get_model_version("mn-encoder", tags["slicefm.model_version"])
    assert mv.run_id == run.info.run_id
    pulled = pull_model(f"mn-encoder:{mv.version}", tmp_path / "pulled", tracking)
    for key in ("encoder.safetensors", "encoder.json"):
        assert (pulled.path / key).read_bytes() == open_store(out).read_bytes(key), key
    # ...and its files are the stage run's artifacts under encoder/ (logged by the launcher, from S3).
    encoder_dir = f"{run.info.artifact_uri}/encoder"
    logged = {Path(a.path).name for a in mlflow.artifacts.list_artifacts(artifact_uri=encoder_dir)}
    assert logged == {"encoder.safetensors", "encoder.json"}


def test_failed_trainjob_fails_its_stage_run_and_registers_nothing(
    kubeconfig, tmp_path, s3_env, tracked_parent
):
    from mlflow.tracking import MlflowClient

    from slicefm.config import PipelineConfig, dump_config
    from slicefm.edge.tracking.pipeline_runs import child_runs

    tracking, parent_id = tracked_parent
    with FakeKube([RUNNING, FAILED]) as fake, pytest.raises(TrainJobFailed, match="FailedJobs"):
        _launch(
            kubeconfig, tmp_path, fake, dump_config(PipelineConfig()), PRE, f"{s3_env}/runs", tracked_parent
        )
    (run,) = child_runs(tracking, parent_id)
    assert run.info.status == "FAILED" and run.data.tags["slicefm.launcher"] == "trainjob"
    assert "slicefm.registered_model" not in run.data.tags
    assert MlflowClient(tracking).search_registered_models() == []


def test_trainjob_render_is_a_verb_of_the_one_cli_tree(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`slicefm trainjob render` prints the manifest build_trainjob makes from the same settings file."""
    from slicefm.edge.cli import main

    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    settings = tmp_path / "settings.yaml"
    settings.write_text(yaml.safe_dump({"num_nodes": 3, "image": "registry.example/slicefm:1"}))
    argv = ["trainjob", "render", "--name", NAME, "--preprocessed", PRE, "--out", OUT,
            "--config", str(config), "--settings", str(settings)]  # fmt: skip
    assert main(argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = build_trainjob(TrainJobConfig(num_nodes=3, image="registry.example/slicefm:1"), NAME, PRE, OUT, CONFIG)
    assert printed == expected and printed["spec"]["trainer"]["numNodes"] == 3
