"""Run every benchmark in turn (each in its own process) and print their final JSON lines together.

    python bench/run_all.py [--quick] [--only cache_io,memory]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = {  # name -> extra options of the documented run (docs/benchmarks.md)
    "cache_vs_live": ["--model", "ViT-B-32", "--frames", "12", "--batch", "24"],
    "extract": ["--model", "ViT-B-32"],
    "eval_scaling": [],
    "cache_io": [],
    "memory": [],
    "train_profile": [],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated subset of " + ", ".join(SCRIPTS))
    args = ap.parse_args()
    names = [n for n in SCRIPTS if not args.only or n in args.only.split(",")]
    results, failed = {}, []
    for name in names:
        cmd = [sys.executable, str(HERE / f"{name}.py"), *SCRIPTS[name], *(["--quick"] if args.quick else [])]
        print(f"\n==> {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        print(proc.stdout, end="", flush=True)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode or not lines:
            failed.append(name)
            continue
        results[name] = json.loads(lines[-1])
    print("\n==> summary")
    for name, res in results.items():
        print(f"{name}: {json.dumps(res)}")
    if failed:
        print(f"failed: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
