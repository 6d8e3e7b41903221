"""Every Triton kernel compiled ahead of time for an H100/H200 (sm_90a) on this CPU-only machine, by
``python -m engram_hf.ops.compile_check``: what the interpreter cannot show (register spills,
compiler errors, 32-bit offsets, an unordered in-place shift).

The quick test compiles one specialisation per kernel (about 10 s of CPU); the slow one compiles
every specialisation the model's configs produce (minutes; CI runs it with ``-m slow``). Both run
the checker in a subprocess: it must import Triton without ``TRITON_INTERPRET``.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

KERNELS = {
    "_hash_gather_fwd",
    "_decode_rows",
    "_chunk_sum",
    "_segment_sum",
    "_gate_fwd",
    "_gate_bwd",
    "_row_scale",
    "_conv_fwd",
    "_conv_bwd",
    "_norm_bwd",
    "_conv_step",
}


def _compile_check(tmp_path, *flags, timeout):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    report_path = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "engram_hf.ops.compile_check", *flags, "--json", str(report_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert report_path.exists(), proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc, json.loads(report_path.read_text())


def test_offsets_are_int64_and_the_decode_shift_is_ordered_by_a_barrier(tmp_path):
    proc, report = _compile_check(tmp_path, "--quick", "--jobs", "1", timeout=600)
    assert proc.returncode == 0, "\n".join(report["failures"])
    assert {r["kernel"] for r in report["results"]} == KERNELS
    for r in report["results"]:
        assert "error" not in r, r
        assert r["i32_offsets"] == [], f"{r['kernel']} computes pointer offsets in 32 bits"
        assert r["spill_stores"] == r["spill_loads"] == 0, r
    step = [r for r in report["results"] if r["kernel"] == "_conv_step"]
    assert step and all(r["barrier_ok"] and r["ptx_barriers"] >= 1 for r in step)
    # The checks themselves catch the defects: each control kernel (one with an i32 offset, one
    # shifting in place without a barrier) was flagged.
    i32_control, shift_control = report["controls"]
    assert i32_control["kernel"] == "_control_i32_offset" and i32_control["i32_offsets"] is True
    assert shift_control["kernel"] == "_control_unordered_shift" and shift_control["barrier_ok"] is False


@pytest.mark.slow
def test_every_specialisation_compiles_for_sm90a_without_spills(tmp_path):
    proc, report = _compile_check(tmp_path, "--jobs", str(min(4, os.cpu_count() or 1)), timeout=3600)
    assert proc.returncode == 0, "\n".join(report["failures"])
    assert {r["kernel"] for r in report["results"]} == KERNELS
    assert report["specialisations"] > 200
