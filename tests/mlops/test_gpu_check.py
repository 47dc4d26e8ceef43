"""benchmarks/gpu_check.sh: the presets it compares, its argument checks, and its CPU smoke run end to end (~2.5 min on 2 quiet cores, in make test):
phantoms, both pipeline runs, the throughput benchmark and the results section, all in temporary folders."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from slicefm.config import PipelineConfig

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
CONFIGS = ROOT / "pipelines" / "configs"
SHARED = ("data", "pretrain_data", "ingest", "preprocess", "extract", "evaluate", "external")
NUM = r"\d\.\d{3} ± \d\.\d{3}"  # a macro AUROC as the section writes it: mean ± sd


def _load(name: str, overlay: bool = False) -> PipelineConfig:
    raw = yaml.safe_load((CONFIGS / name).read_text())
    if overlay:
        raw = _merge(raw, yaml.safe_load((CONFIGS / "gpu-check-smoke.yaml").read_text()))
    return PipelineConfig.model_validate(raw)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def _env(key_file: Path) -> dict[str, str]:
    """The test process's environment without anything that would point the script at the user's state."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK_", "SLICEFM_", "MLFLOW_", "KFP_"))
    }
    env["SLICEFM_PSEUDONYM_KEY_FILE"] = str(key_file)
    return env


@pytest.mark.parametrize("overlay", [False, True], ids=["gpu", "smoke"])
def test_presets_compare_two_methods_on_the_same_data_and_evaluation(overlay):
    lejepa, lecl = _load("gpu-check-lejepa.yaml", overlay), _load("gpu-check-lecl.yaml", overlay)
    for section in SHARED:
        assert getattr(lejepa, section) == getattr(lecl, section), section
    assert (lejepa.pretrain.method, lecl.pretrain.method) == ("lejepa", "lecl")
    assert lejepa.pretrain.aux.mode == "2S" and lejepa.pretrain.aux.lesion_classes == "typed"
    assert lecl.pretrain.lecl.lesion_lambda == 0.0
    assert lejepa.pretrain.encoder == lecl.pretrain.encoder
    assert lejepa.pretrain_data is not None  # typed aux reads lesion labels: never the evaluated cohort's
    assert lejepa.pretrain_data.phantom_seed != lejepa.data.phantom_seed
    assert lejepa.extract.random_baseline
    (task,) = lejepa.evaluate.tasks
    assert task.labels == ["location_*"] and task.protocols == ["abmil"]
    if not overlay:  # paper scale: phantoms at 256 px, slices at 224, ViT-S/16, bf16
        assert lejepa.data.phantom_size == lejepa.pretrain_data.phantom_size == 256
        assert lejepa.preprocess.size == lejepa.pretrain.encoder.img_size == 224
        assert lejepa.pretrain.encoder.name == "vit_small_patch16_224"
        assert lejepa.pretrain.precision == lecl.pretrain.precision == "bf16"


def test_help_and_bad_arguments():
    help_text = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, check=True).stdout
    assert "--smoke" in help_text and "--results FILE" in help_text
    bad = subprocess.run([str(SCRIPT), "--frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown argument '--frobnicate'" in bad.stderr
    bad = subprocess.run([str(SCRIPT), "--deadline", "soon"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--deadline takes whole seconds" in bad.stderr


def test_without_a_gpu_it_stops_at_once(tmp_path, session_key_file):
    import torch

    if shutil.which("nvidia-smi") or torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    results = tmp_path / "RESULTS.md"
    proc = subprocess.run(
        [str(SCRIPT), "--out", str(tmp_path / "out"), "--results", str(results)],
        capture_output=True, text=True, env=_env(session_key_file), timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "no NVIDIA driver" in proc.stderr and "--smoke" in proc.stderr
    assert not results.exists()


def test_shellcheck_is_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


# -- the CPU smoke run, end to end (a few minutes on 2 cores) --------------------------------------------------


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, session_key_file) -> dict:
    tmp = tmp_path_factory.mktemp("gpu-check")
    real_results = ROOT / "benchmarks" / "RESULTS.md"
    default_out = ROOT / "benchmarks" / "gpu_check_out"
    before = (_digest(real_results), default_out.exists())
    results = tmp / "RESULTS.md"
    results.write_text("# Benchmark results\n\nearlier content\n")
    started = time.monotonic()
    proc = subprocess.run(
        [str(SCRIPT), "--smoke", "--out", str(tmp / "out"), "--results", str(results)],
        capture_output=True, text=True, env=_env(session_key_file), timeout=1500,
    )  # fmt: skip
    seconds = time.monotonic() - started
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    after = (_digest(real_results), default_out.exists())
    return {"proc": proc, "out": tmp / "out", "results": results, "seconds": seconds, "before": before,
            "after": after}  # fmt: skip


def test_smoke_run_appends_a_results_section_with_both_methods(smoke):
    text = smoke["results"].read_text()
    assert text.startswith(
        "# Benchmark results\n\nearlier content\n\n## GPU check (`benchmarks/gpu_check.sh --smoke`)"
    )
    section = text.split("## GPU check", 1)[1]
    assert section == (smoke["out"] / "section.md").read_text().split("## GPU check", 1)[1]
    for method in ("lejepa", "lecl"):
        # | run | encoder | pretraining | steps x batch | stage | slices/s | GPUs | pretrained | random | diff | paired |
        row = re.search(rf"^\| {method} \| vit_tiny_test, 32 px \|.*$", section, re.MULTILINE)
        assert row, f"no {method} row in:\n{section}"
        cells = [c.strip() for c in row.group(0).strip("|").split("|")]
        assert cells[3] == "4 x 8"  # the smoke preset's steps x batch
        assert re.fullmatch(r"\d+ \(\d+%\)", cells[5]), cells  # pretraining throughput (data wait share)
        assert cells[6] == "0"  # no GPU visible here: the pretrain step requested none
        assert re.fullmatch(NUM, cells[7]) and re.fullmatch(NUM, cells[8]), cells  # pretrained, random
        assert re.fullmatch(r"[+-]\d\.\d{3}", cells[9]), cells
    for method in ("moco", "lejepa"):  # the throughput benchmark: slices/s measured, no MFU on CPU
        row = re.search(
            rf"^\| {method} \| (\d+\.\d) \| (\d+\.\d) \| (\d+\.\d) \| n/a \| (\d+\.\d) \|", section, re.M
        )
        assert row and float(row.group(1)) > 0 and float(row.group(4)) > 0, section
    for phase in ("preflight", "phantom data", "pipeline lejepa", "pipeline lecl", "MFU benchmark"):
        assert re.search(rf"^\| {phase} \| \d+ s \| ok \|", section, re.MULTILINE), phase


def test_smoke_run_summary_and_printed_figures(smoke):
    import json

    summary = json.loads((smoke["out"] / "summary.json").read_text())
    assert summary["smoke"] and {r["method"] for r in summary["runs"]} == {"lejepa", "lecl"}
    for run in summary["runs"]:
        assert run["status"] == "ok" and run["pipeline_status"] == "FINISHED"
        for weights in ("pretrained", "random"):
            assert 0.0 <= run["auroc"][weights]["mean"] <= 1.0
        assert run["pretrain"]["steps"] == 4 and run["pretrain"]["slices_per_s"] > 0
        assert run["pretrain_gpus"] == 0
    assert [r["method"] for r in summary["mfu"]["runs"]] == ["moco", "lejepa"]
    assert all(r["slices_per_s"] > 0 and r["mfu"] is None for r in summary["mfu"]["runs"])
    out = smoke["proc"].stdout
    assert re.search(rf"lejepa +lesion location AUROC pretrained {NUM}, random {NUM}", out), out
    assert re.search(rf"lecl +lesion location AUROC pretrained {NUM}, random {NUM}", out), out
    assert "MFU bench moco" in out and f"section appended to {smoke['results']}" in out
    print(f"smoke run: {smoke['seconds']:.0f} s")


def test_smoke_run_leaves_the_repository_alone(smoke):
    assert smoke["after"] == smoke["before"]  # benchmarks/RESULTS.md untouched, no benchmarks/gpu_check_out
    work = smoke["out"] / "work"
    assert {p.name for p in (work / "data").iterdir()} == {
        "a-dicom-default-64px-12scans-seed0", "p-dicom-default-64px-6scans-seed2",
    }  # fmt: skip


def test_parallel_phantoms_equal_the_generator_byte_for_byte(smoke, tmp_path, session_key_file):
    """The script generates cohorts with a process pool; the files are those of `slicefm data phantom`."""
    ref = tmp_path / "ref"
    subprocess.run(
        [sys.executable, "-m", "slicefm", "data", "phantom", "--n-scans", "12", "--size", "64",
         "--seed", "0", "--format", "dicom", "--out", str(ref)],
        check=True, capture_output=True, env=_env(session_key_file),
    )  # fmt: skip
    made = smoke["out"] / "work" / "data" / "a-dicom-default-64px-12scans-seed0"

    def tree(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): _digest(p) for p in sorted(root.rglob("*")) if p.is_file()}

    expected = tree(ref)
    assert len(expected) > 12 and tree(made) == expected
