"""Summarise a ``benchmarks/gpu_check.sh`` run: ``summary.json`` and ``summary.md`` in its folder.

    python benchmarks/gpu_summary.py OUT_DIR [--budget 480] [--elapsed S] [--dry-run]

Reads what the run left (``steps.tsv``, ``machine.log``, ``tests.log``, ``bench_engram.json``,
``bench_offload.json``); a missing or broken piece is reported as missing, never guessed. The
issue's GPU targets are checked where their figures exist: gather >= 0.85 of a device copy, the
layer >= 3x PLE forward+backward, and host-tier offload <= 1.5% forward tokens/s loss.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from pathlib import Path

TARGETS = {
    "gather_fraction_of_copy": (">=", 0.85, "gather bandwidth / device copy bandwidth"),
    "layer_fwd_bwd_vs_ple": (">=", 3.0, "layer forward+backward tokens/s vs PLE"),
    "host_offload_fwd_loss": ("<=", 0.015, "forward tokens/s lost with engram_offload='cpu' vs resident"),
}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write(path: Path, text: str) -> None:
    """Write beside, then rename into place: a reader never sees half a summary."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def steps(out: Path) -> list[dict]:
    rows = []
    try:
        lines = (out / "steps.tsv").read_text().splitlines()[1:]
    except OSError:
        return rows
    for line in lines:
        name, status, seconds, detail = (line.split("\t") + ["", "", ""])[:4]
        rows.append({"step": name, "status": status, "seconds": int(seconds or 0), "detail": detail})
    return rows


def test_counts(out: Path) -> dict | None:
    try:
        text = (out / "tests.log").read_text(errors="replace")
    except OSError:
        return None
    # pytest's last line: "61 passed, 3 skipped in 9.0s" (absent if the step was killed).
    finals = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error)", ln) and " in " in ln]
    if not finals:
        return None
    return {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", finals[-1])} or None


def summarize(out: Path, budget: int, elapsed: int, dry_run: bool) -> dict:
    engram = _read_json(out / "bench_engram.json")
    offload = _read_json(out / "bench_offload.json")
    device = None
    try:  # nvidia-smi's "name, memory, driver" row
        rows = [ln for ln in (out / "machine.log").read_text().splitlines() if ln.count(",") == 2]
        device = rows[0].strip() if rows else None
    except OSError:
        pass
    figures = {}
    if engram:
        device = device or engram.get("machine", {}).get("device")
        figures["gather_fraction_of_copy"] = engram.get("gather", {}).get("fraction_of_copy")
        figures["layer_fwd_bwd_vs_ple"] = engram.get("ratios", {}).get("fwd_bwd_vs_ple")
        figures["layer_fwd_vs_ple"] = engram.get("ratios", {}).get("fwd_vs_ple")
        figures["gather_GBps"] = engram.get("gather", {}).get("gather_GBps")
        figures["copy_GBps"] = engram.get("gather", {}).get("copy_GBps")
    if offload:
        cpu = offload.get("tiers", {}).get("cpu", {})
        if "fwd_vs_resident" in cpu:
            figures["host_offload_fwd_loss"] = 1.0 - cpu["fwd_vs_resident"]
    targets = {}
    for key, (op, bound, what) in TARGETS.items():
        value = figures.get(key)
        met = None if value is None else (value >= bound if op == ">=" else value <= bound)
        targets[key] = {"what": what, "target": f"{op} {bound}", "measured": value, "met": met}
    return {
        "dry_run": dry_run,
        "device": device,
        "budget_s": budget,
        "elapsed_s": elapsed,
        "steps": steps(out),
        "tests": test_counts(out),
        "figures": figures,
        "targets": targets,
        "bench_engram": engram,
        "bench_offload": offload,
    }


def markdown(s: dict) -> str:
    def fmt(v):
        return "not measured" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = [
        f"# GPU check{' (dry run: nothing was run)' if s['dry_run'] else ''}",
        "",
        f"Device: {s['device'] or 'unknown'}. Wall time {s['elapsed_s']} s of a {s['budget_s']} s budget.",
        "",
        "| step | status | seconds | detail |",
        "|---|---|---:|---|",
        *[
            f"| {r['step']} | {r['status']} | {r['seconds']} | {r['detail'].replace('|', '&#124;')} |"
            for r in s["steps"]
        ],
        "",
        f"Tests: {s['tests'] if s['tests'] else 'no result'}",
        "",
        "| target | measured | goal | met |",
        "|---|---:|---|---|",
    ]
    for t in s["targets"].values():
        met = "-" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['what']} | {fmt(t['measured'])} | {t['target']} | {met} |")
    engram = s.get("bench_engram")
    if engram:
        lines += ["", "| layer | forward tok/s | forward+backward tok/s |", "|---|---:|---:|"]
        for name, r in engram.get("layers", {}).items():
            lines.append(f"| {name} | {r['fwd_tok_s']:,.0f} | {r['fwd_bwd_tok_s']:,.0f} |")
    offload = s.get("bench_offload")
    if offload:
        lines += [
            "",
            "| tier | forward tok/s | vs resident | decode tok/s | vs resident |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, r in offload.get("tiers", {}).items():
            lines.append(
                f"| {name} | {r['fwd_tok_s']:,.0f} | {r['fwd_vs_resident']:.3f} | {r['decode_tok_s']:,.1f} | "
                f"{r['decode_vs_resident']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--budget", type=int, default=480)
    p.add_argument("--elapsed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    s = summarize(args.out, args.budget, args.elapsed, args.dry_run)
    _write(args.out / "summary.json", json.dumps(s, indent=2))
    _write(args.out / "summary.md", markdown(s))
    print(markdown(s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
