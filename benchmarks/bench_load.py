"""Model load time: cold (GGUF -> float32 safetensors conversion into an empty cache) and cached.

Usage: .venv/bin/python benchmarks/bench_load.py [--model gemma3-270m] [--skip-cold]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import emit, median, peak_rss_mb, timed  # noqa: E402

import lmedit  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--skip-cold", action="store_true")
    args = parser.parse_args()
    result: dict = {"benchmark": "load", "model": args.model}
    if not args.skip_cold:
        with tempfile.TemporaryDirectory() as tmp:
            old = os.environ.get("LMEDIT_CACHE")
            os.environ["LMEDIT_CACHE"] = tmp
            try:
                result["cold_s"] = round(timed(lambda: lmedit.load(args.model))[0], 2)
                result["cached_after_cold_s"] = round(timed(lambda: lmedit.load(args.model))[0], 2)
            finally:
                if old is None:
                    del os.environ["LMEDIT_CACHE"]
                else:
                    os.environ["LMEDIT_CACHE"] = old
    lmedit.load(args.model)  # make sure the user cache is warm
    times = [timed(lambda: lmedit.load(args.model))[0] for _ in range(3)]
    result["cached_s_median_of_3"] = round(median(times), 2)
    result["peak_rss_mb"] = round(peak_rss_mb())
    emit(result)


if __name__ == "__main__":
    main()
