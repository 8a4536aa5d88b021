"""Start-up time of the command line: `--help` of the top level and of subcommands, and `--version`.

Each command runs in a fresh subprocess (what a user waits for), 5 times; the median is reported. Building
the parser imports no torch, so each should answer well under a second.

Usage: .venv/bin/python benchmarks/bench_cli.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit, median, timed  # noqa: E402

COMMANDS = {
    "help": ["--help"],
    "edit_help": ["edit", "--help"],
    "trace_help": ["trace", "--help"],
    "version": ["--version"],
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    result: dict = {"benchmark": "cli", "repeat": args.repeat}
    baseline = [timed(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True))[0] for _ in range(args.repeat)]
    result["python_startup_s"] = round(median(baseline), 3)
    for name, argv in COMMANDS.items():
        def call(argv: list[str] = argv) -> None:
            subprocess.run([sys.executable, "-m", "lmedit.cli.main", *argv], check=True, stdout=subprocess.DEVNULL)
        result[f"{name}_s"] = round(median([timed(call)[0] for _ in range(args.repeat)]), 3)
    result["slowest_s"] = max(v for k, v in result.items() if k.endswith("_s") and k != "python_startup_s")
    emit(result)


if __name__ == "__main__":
    main()
