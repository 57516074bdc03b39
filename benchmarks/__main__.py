"""``python -m benchmarks``: run the suite and write ``results.json`` and ``results.md``."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import (
    end_to_end,
    grpc_ingress,
    inflight,
    listing,
    memory,
    nats_ingress,
    pools,
    real_vllm,
    report,
    scaling,
)
from benchmarks.harness import Stack

BENCHMARKS = {module.NAME: module for module in
              (grpc_ingress, nats_ingress, end_to_end, inflight, memory, scaling,
               listing, real_vllm, pools)}
NEEDS_RAY = {"e2e", "inflight", "memory", "scaling", "vllm", "pools"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--only", action="append", choices=list(BENCHMARKS),
                        help="run this benchmark only (repeatable); the others' results "
                             "already in the JSON are kept")
    parser.add_argument("--quick", action="store_true", help="smaller counts, shorter runs")
    parser.add_argument("--jobs", type=int, default=0,
                        help="deliberations of the end-to-end benchmark (default 1000, "
                             "300 with --quick)")
    parser.add_argument("--out", default=str(report.HERE),
                        help="directory of results.json and results.md")
    parser.add_argument("--render", action="store_true",
                        help="only rewrite results.md from results.json (and analysis.md)")
    args = parser.parse_args(argv)
    if args.render:
        return render(Path(args.out))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop our servers on the way out

    names = args.only or list(BENCHMARKS)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "results.json", out / "results.md"
    command = "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:])
    previous: dict[str, Any] = {}
    if args.only and json_path.exists():
        previous = {b["name"]: b for b in json.loads(json_path.read_text())["benchmarks"]}

    workdir = Path(tempfile.mkdtemp(prefix="rx-bench-"))
    print(f"logs in {workdir}", flush=True)
    started = time.monotonic()
    stack = Stack(workdir)
    done: dict[str, Any] = {}
    try:
        if NEEDS_RAY & set(names):
            print(f"ray head at {stack.ray_address}", flush=True)
        for name in names:
            module = BENCHMARKS[name]
            print(f"== {module.TITLE}", flush=True)
            began = time.monotonic()
            try:
                result = module.run(stack, args.quick, jobs=args.jobs)
            except Exception as exc:
                traceback.print_exc()
                result = {"error": f"{type(exc).__name__}: {exc}"}
            result.update(name=name, title=module.TITLE, quick=args.quick,
                          seconds=round(time.monotonic() - began, 1))
            done[name] = result
            for r in result.get("rows", []):
                print(f"   {r['figure']}: ours {r['ours']} {r['unit']}, baseline "
                      f"{r['baseline']} ({r['baseline_name']}), ratio {r['ratio']}, "
                      f"target {r['target'] or '-'}, met {r['met']}", flush=True)
    finally:
        stack.close()
    merged = {**previous, **done}
    ordered = [merged[name] for name in BENCHMARKS if name in merged]
    analysis = out / "analysis.md"
    results = {"command": command.strip(), "machine": report.machine(),
               "seconds": round(time.monotonic() - started, 1), "benchmarks": ordered,
               "analysis": analysis.read_text() if analysis.exists() else ""}
    report.write(results, json_path, md_path)
    print(f"wrote {json_path} and {md_path} in {results['seconds']} s", flush=True)
    return 0 if all("error" not in b for b in done.values()) else 1


def render(out: Path) -> int:
    results = json.loads((out / "results.json").read_text())
    analysis = out / "analysis.md"
    results["analysis"] = analysis.read_text() if analysis.exists() else ""
    report.write(results, out / "results.json", out / "results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
