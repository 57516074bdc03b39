"""Rows of the results table, the machine description, and ``results.json`` / ``results.md``."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from benchmarks.harness import worker_python

HERE = Path(__file__).resolve().parent


def row(figure: str, unit: str, ours: float | None, baseline: float | None = None,
        baseline_name: str = "", *, ratio_of: str = "ours/baseline", at_least: float | None = None,
        at_most: float | None = None, absolute: bool = False) -> dict[str, Any]:
    """One line of the table. The ratio is ours/baseline; the target applies to the ratio, or
    to ``ours`` itself when ``absolute``."""
    ratio = None
    if ours is not None and baseline:
        ratio = round(ours / baseline, 3)
    checked = ours if absolute else ratio
    target, met = "", None
    if at_least is not None:
        target = f"{'' if absolute else 'ratio '}≥ {at_least:g}"
        met = checked is not None and checked >= at_least
    if at_most is not None:
        target = f"{'' if absolute else 'ratio '}≤ {at_most:g}"
        met = checked is not None and checked <= at_most
    return {"figure": figure, "unit": unit, "ours": _round(ours), "baseline": _round(baseline),
            "baseline_name": baseline_name, "ratio": ratio, "ratio_of": ratio_of,
            "target": target + (f" {unit}" if absolute and target else ""), "met": met}


def _round(value: float | None) -> float | None:
    if value is None:
        return None
    return round(value, 3 if abs(value) < 10 else 1)


def _run(args: list[str]) -> str:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=60,
                              check=False).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine() -> dict[str, Any]:
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    worker = _run([worker_python(), "-c", "import platform, ray; "
                   "print(platform.python_version(), ray.__version__)"]).split()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(), "bridge_python": platform.python_version(),
        "worker_python": worker[0] if worker else "?",
        "ray": worker[1] if len(worker) > 1 else "?",
    }


def write(results: dict[str, Any], json_path: Path, md_path: Path) -> None:
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    md_path.write_text(markdown(results))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        "# ray-executor benchmarks",
        "",
        f"Run {m['date']} with `{results['command']}`. Machine: {m['cpu']}, {m['cores']} cores, "
        f"{m['memory_gb']} GB RAM, Linux {m['kernel']}; bridge Python {m['bridge_python']}, "
        f"worker Python {m['worker_python']}, Ray {m['ray']}. Everything (valkey, NATS "
        "JetStream, a Ray head, the stand-in LLM, bridge, workers, load generators) ran on "
        "this one machine on loopback, so every process competes for the same cores.",
        "",
        "Each figure is measured beside its bare baseline in the same run; targets apply to "
        "the ratio (ours / baseline) unless they carry a unit. Regenerate with `make bench` "
        "(`python -m benchmarks --help` for `--only` and `--quick`).",
        "",
        "| benchmark | figure | ours | baseline | baseline is | ratio | target | met |",
        "|---|---|---:|---:|---|---:|---|:---:|",
    ]
    for bench in results["benchmarks"]:
        if "error" in bench:
            lines.append(f"| {bench['title']} | **failed**: {bench['error']} | | | | | | |")
            continue
        for r in bench["rows"]:
            met = {True: "yes", False: "**no**", None: ""}[r["met"]]
            lines.append(
                f"| {bench['title']} | {r['figure']} ({r['unit']}) | {_fmt(r['ours'])} | "
                f"{_fmt(r['baseline'])} | {r['baseline_name']} | {_fmt(r['ratio'])} | "
                f"{r['target']} | {met} |")
    lines += ["", "## Notes per benchmark", ""]
    for bench in results["benchmarks"]:
        lines.append(f"### {bench['title']}")
        lines.append("")
        lines.append(bench.get("what", ""))
        lines.append("")
        for note in bench.get("notes", []):
            lines.append(f"- {note}")
        cpu = bench.get("cpu")
        if cpu:
            lines.append("")
            lines.append("CPU during the measured phases (share of all cores; a process that ended "
                         "within a phase is not counted):")
            lines.append("")
            for phase, summary in cpu.items():
                parts = ", ".join(f"{k} {v:g}%" for k, v in summary["by_process_pct"].items())
                lines.append(f"- {phase}: machine {summary['machine_busy_pct']:g}% busy — "
                             f"{parts}")
        lines.append("")
    analysis = results.get("analysis")
    if analysis:
        lines += ["## What limits the missed targets", "", analysis.strip(), ""]
    return "\n".join(lines)
