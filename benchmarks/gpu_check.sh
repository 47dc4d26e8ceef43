#!/usr/bin/env bash
# GPU check (issue 15): on one GPU machine, in one go,
#  (a) the paper-scale lesion-location comparison, pretrained vs random weights, for LeJEPA + 2S and for LECL:
#      phantom cohorts A (evaluated) and P (pretraining) generated at 256 px in parallel, then one
#      `slicefm pipeline run` per method (pipelines/configs/gpu-check-{lejepa,lecl}.yaml: ingest, preprocess
#      at 224 px, ViT-S/16 pretraining on P, extraction of A with the pretrained encoder and its random-weight
#      twin, ABMIL lesion location). The LECL run starts once the LeJEPA run has reached its pretraining step,
#      so its data steps overlap the LeJEPA training and the two trainings barely share the GPU;
#  (b) the pretraining MFU benchmark (benchmarks/pretrain.py: ViT-B/16 at 224 px, bf16, MoCo and LeJEPA);
#  (c) a section with the figures appended to the results file (default benchmarks/RESULTS.md), a summary.
#
#   benchmarks/gpu_check.sh [--out DIR] [--work DIR] [--results FILE] [--deadline S] [--peak-tflops T]
#   benchmarks/gpu_check.sh --smoke [--results FILE] ...   # the same on CPU, everything tiny (a few minutes)
#
# --out DIR       logs, derived configs, per-run figures, section.md, summary.json
#                 (default benchmarks/gpu_check_out/<UTC time>; env GPU_CHECK_OUT)
# --work DIR      phantom data, kfp.local outputs and MLflow stores (default DIR/work, ~25 GB on the GPU run);
#                 cohorts already there (same name = same parameters) are reused, run states are recreated
# --results FILE  file the section is appended to (env GPU_CHECK_RESULTS; default benchmarks/RESULTS.md,
#                 with --smoke DIR/RESULTS.md so a smoke run never touches the real one)
# --deadline S    stop launching and kill what still runs S seconds after the start, then write what was
#                 measured (default 570 on GPU: inside a 10-minute command limit; 0 = none, the --smoke default)
# --peak-tflops T the device's dense bf16 peak for MFU (default 989, H100 SXM; H100 PCIe 756)
#
# Exit status: 0 when every phase succeeded, 1 when one failed (the section is still written), 2 on bad usage
# or a failed preflight (no CUDA GPU without --smoke). Needs .venv (make setup) and a pseudonymisation key
# (created like `make run-pipeline` does when there is none).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PY=${PYTHON:-$ROOT/.venv/bin/python}
METHODS=(lejepa lecl)

SMOKE=0
OUT=${GPU_CHECK_OUT:-}
WORK=""
RESULTS=${GPU_CHECK_RESULTS:-}
DEADLINE=""
PEAK_TFLOPS=989

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'; }
die() {
  echo "gpu_check: $*" >&2
  exit 2
}
need_value() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see --help)"; }

while [[ $# -gt 0 ]]; do
  case $1 in
    --smoke) SMOKE=1 ;;
    --out) need_value "$@"; OUT=$2; shift ;;
    --work) need_value "$@"; WORK=$2; shift ;;
    --results) need_value "$@"; RESULTS=$2; shift ;;
    --deadline) need_value "$@"; DEADLINE=$2; shift ;;
    --peak-tflops) need_value "$@"; PEAK_TFLOPS=$2; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

STAMP=$(date -u +%Y%m%d-%H%M%S)
OUT=$(realpath -m "${OUT:-$ROOT/benchmarks/gpu_check_out/$STAMP}")
WORK=$(realpath -m "${WORK:-$OUT/work}")
if [[ -z $RESULTS ]]; then
  if ((SMOKE)); then RESULTS=$OUT/RESULTS.md; else RESULTS=$ROOT/benchmarks/RESULTS.md; fi
fi
RESULTS=$(realpath -m "$RESULTS")
if [[ -z $DEADLINE ]]; then
  if ((SMOKE)); then DEADLINE=0; else DEADLINE=570; fi
fi
[[ $DEADLINE =~ ^[0-9]+$ ]] || die "--deadline takes whole seconds, got '$DEADLINE'"
[[ $PEAK_TFLOPS =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--peak-tflops takes a number, got '$PEAK_TFLOPS'"
[[ -x $PY ]] || die "no Python at $PY: run 'make setup' first (or set PYTHON)"
mkdir -p "$OUT/logs" "$OUT/configs" "$WORK/data"
LOGS=$OUT/logs
PHASES=$OUT/phases.tsv
RUNS=$OUT/runs.tsv
: >"$PHASES"
: >"$RUNS"
CORES=$(nproc)
FAILED=0
BG_PIDS=()

# Background jobs are ours: on any exit, stop the ones still running (pipelines run under `timeout`, which
# forwards the signal to their whole process group, steps included).
# shellcheck disable=SC2317  # invoked by the trap
cleanup() {
  local pid
  for pid in "${BG_PIDS[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { printf '[gpu_check %4ds] %s\n' "$SECONDS" "$*"; }

# phase NAME SECONDS STATUS [NOTE]
phase() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >>"$PHASES"; }

fail() { # fail PHASE LOG MESSAGE
  FAILED=1
  echo "gpu_check: $1 failed: $3" >&2
  if [[ -s $2 ]]; then
    echo "---- last lines of $2 ----" >&2
    tail -n 25 "$2" >&2
    echo "----" >&2
  fi
}

# Seconds left before the deadline, minus what the report needs; a large number without a deadline.
remaining() {
  if ((DEADLINE == 0)); then echo 86400; else echo $((DEADLINE - SECONDS - 20)); fi
}

# The Python side: derived configs, parallel phantoms, MLflow look-ups and the report (one place, no extra file).
read -r -d '' HELPER <<'PYEOF' || true
import json
import math
import os
import sys
from pathlib import Path


def deep_merge(base, over):
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def cmd_derive(cfg_dir, data_dir, overlay, *presets):
    """METHOD=PRESET... -> CFG_DIR/METHOD.yaml with the cohorts under DATA_DIR, and CFG_DIR/cohorts.tsv."""
    import yaml

    from slicefm.config import PipelineConfig, dump_config

    cfgs = {}
    for spec in presets:
        method, path = spec.split("=", 1)
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if overlay:
            raw = deep_merge(raw, yaml.safe_load(Path(overlay).read_text()) or {})
        cfg = PipelineConfig.model_validate(raw)
        if cfg.pretrain_data is None:
            sys.exit(f"{path}: the GPU check pretrains on its own cohort: set pretrain_data")
        for data in (cfg.data, cfg.pretrain_data):
            name = (f"{data.cohort or 'cohort'}-{data.phantom_format}-{data.phantom_profile}-{data.phantom_size}px-"
                    f"{data.phantom_scans}scans-seed{data.phantom_seed}")
            data.source = str(Path(data_dir) / name)
            data.phantom_if_missing = False  # generated beforehand, in parallel
        cfgs[method] = cfg
    ref_method, ref = next(iter(cfgs.items()))
    for method, cfg in cfgs.items():
        for section in ("data", "pretrain_data", "ingest", "preprocess", "extract", "evaluate", "external"):
            if getattr(cfg, section) != getattr(ref, section):
                sys.exit(f"the {section} sections of the {ref_method} and {method} presets differ: "
                         "the comparison needs the same data, extraction and evaluation")
        Path(cfg_dir, f"{method}.yaml").write_text(dump_config(cfg))
    rows = [[d.source, d.phantom_scans, d.phantom_seed, d.phantom_size, d.phantom_profile, d.phantom_format]
            for d in (ref.data, ref.pretrain_data)]
    Path(cfg_dir, "cohorts.tsv").write_text("".join("\t".join(map(str, r)) + "\n" for r in rows))


def _scan(args, kwargs):
    from slicefm.phantom import generate

    return generate.generate_scan(*args, **kwargs)


def cmd_phantom(out, n, seed, size, profile, fmt, workers):
    """`slicefm data phantom` with the scans generated by a process pool. generate_cohort itself draws every
    scan's random stream and patient, with generate_scan deferred; the pool then runs the deferred calls, so
    the files are byte-identical to the single-process generator's (tests/mlops/test_gpu_check.py checks)."""
    import multiprocessing

    from slicefm.phantom import dataset, generate

    real_cohort, real_scan = dataset.generate_cohort, generate.generate_scan

    def parallel_cohort(*args, **kwargs):
        calls = []
        generate.generate_scan = lambda *a, **k: calls.append((a, k))
        try:
            real_cohort(*args, **kwargs)
        finally:
            generate.generate_scan = real_scan
        with multiprocessing.get_context("fork").Pool(int(workers)) as pool:
            return pool.starmap(_scan, calls, chunksize=1)

    dataset.generate_cohort = parallel_cohort
    dataset.generate_dataset(Path(out), int(n), fmt, seed=int(seed), shape_xy=int(size), profile=profile)
    print(f"wrote {n} phantom scans ({fmt}, {size} px, profile {profile}, seed {seed}, {workers} workers) -> {out}")


def _stages(uri, experiment, run_name):
    from slicefm.edge.tracking.pipeline_runs import child_runs, find_parent_run

    parent = find_parent_run(uri, experiment, run_name)
    if parent is None:
        return None, {}
    stages = {}
    for r in child_runs(uri, parent.info.run_id):
        end = r.info.end_time
        stages[r.data.tags.get("slicefm.stage", r.info.run_name)] = {
            "status": r.info.status,
            "seconds": (end - r.info.start_time) / 1000 if end else None,
            "output_uri": r.data.tags.get("slicefm.output_uri"),
            "metrics": dict(r.data.metrics),
        }
    return parent.info.status, stages


def cmd_stage_uri(uri, experiment, run_name, stage):
    """Print a finished stage's output location (nothing when there is none)."""
    try:
        _, stages = _stages(uri, experiment, run_name)
    except Exception:  # noqa: BLE001 (no MLflow store yet: the run never started)
        return
    st = stages.get(stage, {})
    if st.get("status") == "FINISHED" and st.get("output_uri"):
        print(st["output_uri"])


def _auroc(macro, model):
    for key, per in macro.items():
        if key.split(" · ")[0] == model and key.endswith("abmil"):
            return per["auroc"]
    return None


def run_info(method, cfg_path, uri, experiment, run_name, state, status, seconds, offset):
    import yaml

    cfg = yaml.safe_load(Path(cfg_path).read_text())
    pre = cfg["pretrain"]
    info = {
        "method": method, "run_name": run_name, "status": status, "seconds": int(seconds),
        "started_at_s": int(offset), "config": cfg_path, "encoder": pre["encoder"]["name"],
        "img_size": pre["encoder"]["img_size"], "batch": pre["loader"]["batch_size"],
        "max_steps": pre["schedule"]["max_steps"], "aux": pre["aux"]["mode"],
        "lesion_classes": pre["aux"]["lesion_classes"], "precision": pre["precision"],
        "eval_scans": cfg["data"]["phantom_scans"], "pretrain_scans": cfg["pretrain_data"]["phantom_scans"],
        "n_folds": cfg["evaluate"]["splits"]["n_folds"],
    }  # fmt: skip
    try:
        info["pipeline_status"], info["stages"] = _stages(uri, experiment, run_name)
    except Exception as err:  # noqa: BLE001
        info["error"] = f"no MLflow record: {err}"
        return info
    stages = info["stages"]
    out = stages.get("pretrain", {}).get("output_uri")
    if out and Path(out, "pretrain_result.json").exists():
        info["pretrain"] = json.loads(Path(out, "pretrain_result.json").read_text())
        info["pretrain"]["memory_mb"] = stages["pretrain"]["metrics"].get("memory_mb")
    for path in sorted(Path(state, "kfp").glob("*/pretrain*/executor_output.json")):
        arts = json.loads(path.read_text()).get("artifacts", {}).get("encoder", {}).get("artifacts", [{}])
        info["pretrain_gpus"] = arts[0].get("metadata", {}).get("gpus")
    ev = stages.get("evaluate", {}).get("output_uri")
    if ev and Path(ev, "results.json").exists():
        res = json.loads(Path(ev, "results.json").read_text())
        task = "lesion_location" if "lesion_location" in res["macro"] else res["headline_task"]
        info["task"], info["results_json"] = task, str(Path(ev, "results.json"))
        info["auroc"] = {m: _auroc(res["macro"][task], m) for m in ("pretrained", "random")}
        paired = res.get("paired")
        if paired is not None:
            info["paired"] = paired.get(task, paired) if isinstance(paired, dict) else paired
            info["paired_metric"] = res.get("paired_metric", "auroc")
    return info


def _num(x, fmt=".3f"):
    return format(x, fmt) if isinstance(x, (int, float)) and math.isfinite(x) else "n/a"


def _auc(a):
    if not a:
        return "n/a"
    if a.get("mean") is None:
        return a.get("note") or "n/a"
    return f"{a['mean']:.3f} ± {a['sd']:.3f}"


def _paired(p):
    """results.json's paired section for the task (slicefm.evaluate.paired: [protocol][set] -> mean_diff, ci_low,
    ci_high, n_folds, verdict) as `+0.012 [-0.010, +0.034] over 5 folds: verdict`; any other shape as short
    `key value` items."""
    node = p
    for key in ("abmil", "pretrained"):
        if isinstance(node, dict) and key in node:
            node = node[key]
    if isinstance(node, dict) and "mean_diff" in node:
        if node["mean_diff"] is None:
            return node.get("verdict") or "n/a"
        ci = ""
        if node.get("ci_low") is not None and node.get("ci_high") is not None:
            ci = f" [{node['ci_low']:+.3f}, {node['ci_high']:+.3f}]"
        return f"{node['mean_diff']:+.3f}{ci} over {node.get('n_folds', '?')} folds: {node.get('verdict', '')}"
    items = []

    def walk(x, key):
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(x, bool) or x is None:
            items.append(f"{key} {x}")
        elif isinstance(x, (int, float)):
            items.append(f"{key} {x:.3g}")
        elif isinstance(x, list) and len(x) <= 4 and all(isinstance(v, (int, float)) for v in x):
            items.append(f"{key} [{', '.join(f'{v:.3g}' for v in x)}]")
        elif isinstance(x, str) and len(x) <= 60:
            items.append(f"{key} {x}")

    walk(p, "")
    return "; ".join(items[:8]) + (" …" if len(items) > 8 else "") if items else "(empty)"


def _pct(x):
    return f"{x:.1%}" if isinstance(x, (int, float)) and math.isfinite(x) else "n/a"


def _secs(x):
    return f"{x:.0f} s" if isinstance(x, (int, float)) else "-"


def cmd_report(out_dir, section_path, summary_path):
    out = Path(out_dir)
    env = os.environ
    phases = [dict(zip(("phase", "seconds", "status", "note"), line.split("\t"), strict=True))
              for line in (out / "phases.tsv").read_text().splitlines() if line]
    runs = [run_info(*line.split("\t")) for line in (out / "runs.tsv").read_text().splitlines() if line]
    runs.sort(key=lambda r: r["started_at_s"])
    mfu = json.loads((out / "mfu.json").read_text()) if (out / "mfu.json").exists() else None
    smoke = env["GC_SMOKE"] == "1"
    first = runs[0] if runs else {}
    L = [f"## GPU check (`benchmarks/gpu_check.sh{' --smoke' if smoke else ''}`), {env['GC_DATE']}", ""]
    if smoke:
        L += ["CPU smoke run: every setting shrunk (pipelines/configs/gpu-check-smoke.yaml); the figures check the",
              "script end to end and say nothing about the methods.", ""]
    L += [f"Machine: {env['GC_DEVICE']}, {env['GC_CORES']} CPU cores, torch {env['GC_TORCH']}; commit "
          f"{env['GC_COMMIT']}. Raw logs and figures: `{out}`.", ""]
    if runs:
        L += [f"Lesion location (8 DeepLesion locations), ABMIL on both windows, nested {first['n_folds']}-fold CV on "
              f"phantom cohort A ({first['eval_scans']} scans); encoders pretrained on cohort P "
              f"({first['pretrain_scans']} other patients) in `slicefm pipeline run` (kfp.local) with "
              f"pipelines/configs/gpu-check-<run>.yaml; macro AUROC mean ± sd over folds; the random-weight twin "
              "is the same architecture re-initialised. `pretrained - random` is the difference of the means; "
              "`paired` is results.json's paired comparison when it has one (per-fold difference of the macro "
              "metric on the same folds, mean and 95% t-interval over folds).", "",
              "| run | encoder | pretraining | steps x batch | pretrain stage | slices/s (data wait) | GPUs requested "
              "| pretrained | random weights | pretrained - random | paired |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in runs:
            a = r.get("auroc") or {}
            p, rnd = (a.get("pretrained") or {}).get("mean"), (a.get("random") or {}).get("mean")
            diff = f"{p - rnd:+.3f}" if p is not None and rnd is not None else "n/a"
            pr = r.get("pretrain") or {}
            method = {"lejepa": "LeJEPA", "lecl": "LECL", "moco": "MoCo-v3"}.get(r["method"], r["method"])
            if r["aux"]:
                method += f" + {r['aux']} ({r['lesion_classes']})"
            rate = pr.get("slices_per_s")
            wait, comp = pr.get("data_wait_s"), pr.get("compute_s")
            share = f" ({wait / (wait + comp):.0%})" if wait is not None and comp else ""
            steps = pr.get("steps", "-")
            stage = r.get("stages", {}).get("pretrain", {}).get("seconds")
            precision = "fp32 (CPU)" if smoke else r["precision"]
            L.append(f"| {r['method']} | {r['encoder']}, {r['img_size']} px | {method}, {precision} | "
                     f"{steps} x {r['batch']} | {_secs(stage)} | {_num(rate, '.0f')}{share} | "
                     f"{r.get('pretrain_gpus', '-')} | {_auc(a.get('pretrained'))} | {_auc(a.get('random'))} | "
                     f"{diff} | {_paired(r['paired']) if 'paired' in r else 'not in results.json'} |")
        L.append("")
        notes = [f"{r['method']}: pipeline {r['status']}" + (f" ({r['error']})" if "error" in r else "")
                 for r in runs if r["status"] != "ok" or "error" in r]
        for r in runs:
            if not smoke and r.get("pretrain_gpus") == 0:
                notes.append(f"{r['method']}: the pretrain step requested no GPU (torch saw none in the run)")
            pr = r.get("pretrain") or {}
            col = pr.get("collapse") or {}
            bits = [f"loss {_num(pr.get('loss_first'))} -> {_num(pr.get('loss_last'))}" if pr else None,
                    f"backbone effective rank {_num(col['eff_rank'], '.1f')}" if "eff_rank" in col else None,
                    f"peak {'' if smoke else 'GPU '}memory {pr['memory_mb'] / 1024:.1f} GiB" if pr.get("memory_mb") else None]
            if any(bits):
                notes.append(f"{r['method']} pretraining: " + ", ".join(b for b in bits if b))
        L += [f"- {n}" for n in notes] + ([""] if notes else [])
        names = [s for s in ("ingest", "preprocess", "ingest-p", "preprocess-p", "pretrain", "extract",
                             "extract-random", "evaluate") if any(s in r.get("stages", {}) for r in runs)]
        if names:
            L += ["Stage wall times (MLflow stage runs, process start-up excluded):", "",
                  "| run | started at | pipeline wall | " + " | ".join(names) + " |",
                  "|---|---|---|" + "---|" * len(names)]
            for r in runs:
                st = r.get("stages", {})
                L.append(f"| {r['method']} | +{r['started_at_s']} s | {r['seconds']} s | "
                         + " | ".join(_secs(st.get(s, {}).get("seconds")) for s in names) + " |")
            L.append("")
    L += ["Wall time per phase:", "", "| phase | wall | status | note |", "|---|---|---|---|"]
    L += [f"| {p['phase']} | {p['seconds']} s | {p['status']} | {p['note']} |" for p in phases]
    L += [f"| total | {env['GC_TOTAL']} s | | |", ""]
    if mfu and mfu.get("runs"):
        r0 = mfu["runs"][0]
        peak = f"{mfu['peak_tflops']:g} TFLOPs bf16 peak" if mfu.get("peak_tflops") else "no MFU on CPU"
        L += [f"Pretraining throughput (`benchmarks/pretrain.py`): {r0['encoder']}, {r0['img_size']} px, "
              f"{r0['precision']}, batch {r0['batch']}, {r0['steps']} steps, {r0['workers']} loader workers, "
              f"{peak}; steady = the windows of {mfu['window']} steps after the first; MFU = forward+backward "
              "FLOPs of the two trained views / step time / peak, `MFU compute` over compute time only "
              "(no data wait).", "",
              "| method | slices/s | data wait ms/step | compute ms/step | MFU | steady slices/s | steady data wait "
              "ms | steady compute ms | steady MFU | MFU compute |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for r in mfu["runs"]:
            L.append(f"| {r['method']} | {_num(r['slices_per_s'], '.1f')} | {_num(r['data_wait_ms'], '.1f')} | "
                     f"{_num(r['compute_ms'], '.1f')} | {_pct(r['mfu'])} | {_num(r.get('steady_slices_per_s'), '.1f')} | "
                     f"{_num(r.get('steady_data_wait_ms'), '.1f')} | {_num(r.get('steady_compute_ms'), '.1f')} | "
                     f"{_pct(r.get('steady_mfu'))} | {_pct(r.get('steady_mfu_compute'))} |")
        L.append("")
    Path(section_path).write_text("\n".join(L))
    summary = {
        "smoke": smoke, "date": env["GC_DATE"], "device": env["GC_DEVICE"], "commit": env["GC_COMMIT"],
        "total_s": int(env["GC_TOTAL"]), "phases": phases, "runs": runs, "mfu": mfu, "out": str(out),
        "results_file": env["GC_RESULTS"],
    }  # fmt: skip
    Path(summary_path).write_text(json.dumps(summary, indent=1, default=str))
    # The short summary on stdout.
    print(f"GPU check{' (smoke, CPU)' if smoke else ''} on {env['GC_DEVICE']}, commit {env['GC_COMMIT']}: "
          f"{env['GC_TOTAL']} s")
    for r in runs:
        a = r.get("auroc") or {}
        pr = r.get("pretrain") or {}
        print(f"  {r['method']:7s} lesion location AUROC pretrained {_auc(a.get('pretrained'))}, random "
              f"{_auc(a.get('random'))}" + (f", paired {_paired(r['paired'])}" if "paired" in r else "")
              + f"; pretraining {pr.get('steps', '-')} steps, {_num(pr.get('slices_per_s'), '.0f')} slices/s; "
              f"pipeline {r['status']} in {r['seconds']} s")
    for r in (mfu or {}).get("runs", []):
        print(f"  MFU bench {r['method']:6s} {r['encoder']}: {_num(r['slices_per_s'], '.1f')} slices/s "
              f"(steady {_num(r.get('steady_slices_per_s'), '.1f')}), MFU {_pct(r['mfu'])} "
              f"(steady {_pct(r.get('steady_mfu'))}, compute only {_pct(r.get('steady_mfu_compute'))})")
    for p in phases:
        if p["status"] != "ok":
            print(f"  phase {p['phase']}: {p['status']} {p['note']}")


if __name__ == "__main__":
    globals()["cmd_" + sys.argv[1].replace("-", "_")](*sys.argv[2:])
PYEOF
helper() { "$PY" -c "$HELPER" "$@"; }

# ---------------------------------------------------------------------------------------------- preflight
t0=$SECONDS
log "out: $OUT  work: $WORK  results: $RESULTS$( ((DEADLINE)) && echo "  deadline: ${DEADLINE} s")"
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true PYTHONUNBUFFERED=1
TORCH=$("$PY" -c 'import torch; print(torch.__version__, "(CUDA build", torch.version.cuda or "none", end=")")') ||
  die "cannot import torch with $PY: run 'make setup'"
if ((SMOKE)); then
  DEVICE="CPU ($(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1))"
else
  command -v nvidia-smi >/dev/null || die "no nvidia-smi: this machine has no NVIDIA driver (use --smoke for the CPU run)"
  DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>"$LOGS/nvidia-smi.log" | head -n 1) || true
  [[ -n $DEVICE ]] || die "nvidia-smi lists no GPU ($(head -c 300 "$LOGS/nvidia-smi.log")); use --smoke for the CPU run"
  "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() and torch.cuda.device_count() > 0 else 1)' ||
    die "torch $TORCH sees no CUDA GPU although nvidia-smi lists '$DEVICE' (driver / CUDA build mismatch?)"
  nvidia-smi >"$LOGS/nvidia-smi.log" 2>&1 || true
fi
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ $COMMIT != unknown ]] && [[ -n $(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
  COMMIT="$COMMIT + uncommitted changes"
fi
"$PY" -m slicefm key init --if-missing >"$LOGS/key.log" 2>&1 || die "no pseudonymisation key: $(tail -n 3 "$LOGS/key.log")"
PRESETS=()
for m in "${METHODS[@]}"; do PRESETS+=("$m=$ROOT/pipelines/configs/gpu-check-$m.yaml"); done
OVERLAY=""
if ((SMOKE)); then OVERLAY=$ROOT/pipelines/configs/gpu-check-smoke.yaml; fi
helper derive "$OUT/configs" "$WORK/data" "$OVERLAY" "${PRESETS[@]}" >"$LOGS/configs.log" 2>&1 ||
  die "the GPU check presets do not make valid configs: $(tail -n 5 "$LOGS/configs.log")"
log "device: $DEVICE; torch $TORCH; $CORES cores; commit $COMMIT"
# Room for the data (the GPU run writes ~25 GB under --work) and for the loader workers' shared memory.
free_gb=$(($(df -Pk "$WORK" | awk 'NR == 2 { print $4 }') / 1048576))
shm_gb=$(($(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 { print $2 }' || echo 0) / 1048576))
log "free under --work: $free_gb GB; /dev/shm: $shm_gb GB"
if ((!SMOKE && free_gb < 30)); then log "WARNING: the GPU run writes ~25 GB under $WORK, $free_gb GB free"; fi
if ((!SMOKE && shm_gb < 4)); then
  log "WARNING: /dev/shm holds $shm_gb GB: data-loader workers pass batches through it and may die of a bus error"
fi
phase preflight $((SECONDS - t0)) ok "$DEVICE"

# ------------------------------------------------------------------------------------------ phantom data
# Cohorts A and P at once, each with a share of the cores for its pool; an existing cohort is reused.
t0=$SECONDS
log "phantom cohorts"
gen_pids=()
gen_logs=()
total_scans=$(awk -F'\t' '{ s += $2 } END { print s }' "$OUT/configs/cohorts.tsv")
while IFS=$'\t' read -r src n seed size profile fmt; do
  name=$(basename "$src")
  if [[ -d $src ]] && [[ -n $(ls -A "$src") ]]; then
    log "  $name: present, reused"
    continue
  fi
  workers=$(((CORES * n + total_scans - 1) / total_scans))
  log "  $name: $n scans at $size px, $workers workers"
  helper phantom "$src" "$n" "$seed" "$size" "$profile" "$fmt" "$workers" >"$LOGS/phantom-$name.log" 2>&1 &
  gen_pids+=($!)
  gen_logs+=("$LOGS/phantom-$name.log")
  BG_PIDS+=($!)
done <"$OUT/configs/cohorts.tsv"
data_ok=1
for i in "${!gen_pids[@]}"; do
  if ! wait "${gen_pids[$i]}"; then
    data_ok=0
    fail "phantom data" "${gen_logs[$i]}" "generating $(basename "${gen_logs[$i]}" .log) failed"
  fi
done
if ((data_ok)); then phase "phantom data" $((SECONDS - t0)) ok "$total_scans scans"; else
  phase "phantom data" $((SECONDS - t0)) failed "see logs/phantom-*.log"
fi

# ---------------------------------------------------------------------------------------------- pipelines
# One `slicefm pipeline run` per method, each with its own state (kfp.local outputs, MLflow sqlite store).
# The steps get the GPUs torch sees (pipelines/runner.py), so the pretrain step requests 1 GPU here and 0 in
# the CPU smoke run; runs.tsv / the section record what each pretrain step asked for.
declare -A RUN_PID RUN_T0 RUN_NAME
start_run() {
  local m=$1 state=$WORK/state-$1 left
  left=$(remaining)
  if ((left < 60)); then
    log "pipeline $m: not started, $left s left before the deadline"
    phase "pipeline $m" 0 "skipped" "$left s left before the deadline"
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$m" "$OUT/configs/$m.yaml" "sqlite:///$state/mlflow.db" \
      gpu-check "-" "$state" "skipped (deadline)" 0 "$SECONDS" >>"$RUNS"
    return 0
  fi
  rm -rf "$state"
  mkdir -p "$state"
  RUN_NAME[$m]=gpu-check-$m-$STAMP
  RUN_T0[$m]=$SECONDS
  log "pipeline $m: started (run ${RUN_NAME[$m]}, at most $left s)"
  env -u SLICEFM_STORE -u KFP_HOST SLICEFM_HOME="$state" MLFLOW_TRACKING_URI="sqlite:///$state/mlflow.db" \
    OMP_NUM_THREADS=$(((CORES + 1) / 2)) \
    timeout --kill-after=20 "$left" "$PY" -m slicefm pipeline run --runner subprocess \
    --config "$OUT/configs/$m.yaml" --run-name "${RUN_NAME[$m]}" >"$LOGS/pipeline-$m.log" 2>&1 &
  RUN_PID[$m]=$!
  BG_PIDS+=($!)
}

finish_run() {
  local m=$1 state=$WORK/state-$1 rc=0 status=ok secs
  [[ -n ${RUN_PID[$m]:-} ]] || return 0
  wait "${RUN_PID[$m]}" || rc=$?
  secs=$((SECONDS - RUN_T0[$m]))
  if ((rc == 124 || rc == 137)); then
    status="killed at the deadline"
    fail "pipeline $m" "$LOGS/pipeline-$m.log" "$status after $secs s"
  elif ((rc != 0)); then
    status="failed (exit $rc)"
    fail "pipeline $m" "$LOGS/pipeline-$m.log" "exit $rc"
  fi
  log "pipeline $m: $status after $secs s"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$m" "$OUT/configs/$m.yaml" "sqlite:///$state/mlflow.db" \
    gpu-check "${RUN_NAME[$m]}" "$state" "$status" "$secs" "${RUN_T0[$m]}" >>"$RUNS"
  phase "pipeline $m" "$secs" "$status" "started at +${RUN_T0[$m]} s"
}

if ((data_ok)); then
  first=${METHODS[0]}
  start_run "$first"
  # The next run starts when the first one's pretrain step has begun (or the first one ended).
  if [[ -n ${RUN_PID[$first]:-} ]]; then
    while kill -0 "${RUN_PID[$first]}" 2>/dev/null && ! compgen -G "$WORK/state-$first/kfp/*/pretrain*" >/dev/null; do
      sleep 2
    done
  fi
  for m in "${METHODS[@]:1}"; do start_run "$m"; done
  for m in "${METHODS[@]}"; do finish_run "$m"; done
else
  for m in "${METHODS[@]}"; do phase "pipeline $m" 0 "not run" "no data"; done
fi

# ------------------------------------------------------------------------------------------ MFU benchmark
# On the pretraining cohort P as the first run preprocessed it (2 stacked windows), the GPU to itself.
t0=$SECONDS
pre_p=""
for m in "${METHODS[@]}"; do
  [[ -n ${RUN_NAME[$m]:-} ]] || continue
  pre_p=$(helper stage-uri "sqlite:///$WORK/state-$m/mlflow.db" gpu-check "${RUN_NAME[$m]}" preprocess-p 2>/dev/null || true)
  if [[ -n $pre_p ]]; then break; fi
done
if ((SMOKE)); then
  BENCH=(--encoders vit_tiny_test --img-size 32 --batch 8 --steps 4 --window 2 --workers 0)
else
  BENCH=(--encoders vit_base_patch16_224 --img-size 224 --batch 128 --steps 48 --window 16
    --workers $((CORES > 14 ? 12 : (CORES > 2 ? CORES - 2 : 0))))
fi
left=$(remaining)
if [[ -z $pre_p ]]; then
  phase "MFU benchmark" 0 "not run" "no preprocessed cohort P"
elif ((left < 60)); then
  phase "MFU benchmark" 0 "skipped" "$left s left before the deadline"
else
  log "MFU benchmark (${BENCH[*]})"
  rc=0
  timeout --kill-after=20 "$left" "$PY" benchmarks/pretrain.py --preprocessed "$pre_p" --methods moco lejepa \
    "${BENCH[@]}" --peak-tflops "$PEAK_TFLOPS" --json "$OUT/mfu.json" >"$LOGS/mfu.log" 2>&1 || rc=$?
  if ((rc == 0)); then phase "MFU benchmark" $((SECONDS - t0)) ok "${BENCH[*]}"; else
    fail "MFU benchmark" "$LOGS/mfu.log" "exit $rc"
    phase "MFU benchmark" $((SECONDS - t0)) "failed (exit $rc)" "${BENCH[*]}"
  fi
fi

# ----------------------------------------------------------------------------------------------- report
log "report"
mkdir -p "$(dirname "$RESULTS")"
GC_SMOKE=$SMOKE GC_DATE=$(date -u +%Y-%m-%d) GC_DEVICE=$DEVICE GC_CORES=$CORES GC_TORCH=$TORCH GC_COMMIT=$COMMIT \
  GC_TOTAL=$SECONDS GC_RESULTS=$RESULTS \
  helper report "$OUT" "$OUT/section.md" "$OUT/summary.json" >"$OUT/summary.txt" 2>"$LOGS/report.log" || {
  cat "$LOGS/report.log" >&2
  echo "gpu_check: the report failed; the raw figures are under $OUT" >&2
  exit 1
}
{
  [[ -s $RESULTS ]] && echo
  cat "$OUT/section.md"
} >>"$RESULTS"
cat "$OUT/summary.txt"
echo "  section appended to $RESULTS; logs, configs and figures in $OUT"
exit "$FAILED"
