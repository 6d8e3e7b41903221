"""benchmarks/gpu_check.sh, the prepared GPU check, and its summary: what runs without a GPU.

The script's GPU work cannot run here; its plan (dry run), its bookkeeping when steps succeed,
fail or run out of time (with a stand-in Python), and the summary's target checks can.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_summary  # noqa: E402


def _run(tmp_path, *args, env=None):
    return subprocess.run(
        ["bash", str(SCRIPT), *args, "--out", str(tmp_path / "out")],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_dry_run_plans_every_step_and_writes_a_summary(tmp_path):
    proc = _run(tmp_path, "--dry-run", env={"PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["dry_run"]
    steps = [s["step"] for s in summary["steps"]]
    assert steps == ["machine", "install", "tests", "bench_engram", "bench_offload"]
    assert all(s["status"] == "dry-run" for s in summary["steps"])
    plan = " ".join(s["detail"] for s in summary["steps"])
    assert "bench_engram.py --device cuda --json" in plan and "bench_offload.py --device cuda --json" in plan
    assert "not measured" in (tmp_path / "out" / "summary.md").read_text()


def test_failed_and_slow_steps_keep_the_other_results(tmp_path):
    """A stand-in Python: the tests pass, the layer benchmark reports, the offload benchmark fails."""
    fake = tmp_path / "python"
    fake.write_text(
        f"""#!/usr/bin/env bash
case "$*" in
  *gpu_summary.py*) exec {sys.executable} "$@" ;;
  *"-m pytest"*) echo "61 passed, 3 skipped in 9.0s"; exit 0 ;;
  *bench_engram.py*) echo '{{"ratios": {{"fwd_bwd_vs_ple": 3.4}}, "gather": {{"fraction_of_copy": 0.8}}}}' ;;
  *bench_offload.py*) echo "CUDA error: out of memory" >&2; exit 3 ;;
  *) exec {sys.executable} "$@" ;;
esac
"""
    )
    fake.chmod(0o755)
    proc = _run(tmp_path, "--skip-install", env={"PYTHON": str(fake)})
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status == {"machine": "ok", "tests": "ok", "bench_engram": "ok", "bench_offload": "failed"}
    assert summary["tests"] == {"passed": 61, "skipped": 3}
    assert summary["targets"]["layer_fwd_bwd_vs_ple"]["met"] is True
    assert summary["targets"]["gather_fraction_of_copy"]["met"] is False
    assert summary["targets"]["host_offload_fwd_loss"]["measured"] is None
    assert "out of memory" in (out / "bench_offload.log").read_text()


def test_budget_runs_out_and_the_summary_is_still_written(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(
        f"""#!/usr/bin/env bash
case "$*" in
  *"-m pytest"*) sleep 60 ;;
  *gpu_summary.py*) exec {sys.executable} "$@" ;;
  *) echo "3.11 2.13.0 12.8" ;;
esac
"""
    )
    fake.chmod(0o755)
    proc = _run(tmp_path, "--skip-install", env={"PYTHON": str(fake), "GPU_CHECK_BUDGET": "38"})
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status["tests"] == "timeout"
    assert status["bench_engram"] == status["bench_offload"] == "skipped"


def test_summary_checks_each_target_against_its_bound(tmp_path):
    (tmp_path / "steps.tsv").write_text("step\tstatus\tseconds\tdetail\nbench_engram\tok\t90\trc=0\n")
    (tmp_path / "bench_engram.json").write_text(
        json.dumps(
            {
                "machine": {"device": "NVIDIA H100 80GB HBM3"},
                "ratios": {"fwd_bwd_vs_ple": 2.9, "fwd_vs_ple": 1.4},
                "gather": {"fraction_of_copy": 0.86, "gather_GBps": 2600.0, "copy_GBps": 3020.0},
                "layers": {"ours": {"fwd_tok_s": 1e6, "fwd_bwd_tok_s": 3e5}},
            }
        )
    )
    (tmp_path / "bench_offload.json").write_text(
        json.dumps(
            {
                "tiers": {
                    "resident": {
                        "fwd_tok_s": 100.0,
                        "fwd_vs_resident": 1.0,
                        "decode_tok_s": 50.0,
                        "decode_vs_resident": 1.0,
                    },
                    "cpu": {
                        "fwd_tok_s": 98.0,
                        "fwd_vs_resident": 0.98,
                        "decode_tok_s": 49.0,
                        "decode_vs_resident": 0.98,
                    },
                }
            }
        )
    )
    gpu_summary.main([str(tmp_path), "--elapsed", "300"])
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["device"] == "NVIDIA H100 80GB HBM3"
    assert s["targets"]["gather_fraction_of_copy"]["met"] is True
    assert s["targets"]["layer_fwd_bwd_vs_ple"]["met"] is False
    assert s["targets"]["host_offload_fwd_loss"]["measured"] == pytest.approx(0.02)
    assert s["targets"]["host_offload_fwd_loss"]["met"] is False
    assert "| ours | 1,000,000 | 300,000 |" in (tmp_path / "summary.md").read_text()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_script_passes_shellcheck():
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    assert Path(SCRIPT).stat().st_mode & 0o111, "executable"
