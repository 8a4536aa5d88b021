"""The web app's Edit click against the same edit from the command line (issue #18: at most 1.2x).

Web: `lmedit serve --model M` runs in a subprocess (start-up and model load not timed) and headless Chromium
(Debian's chromium + chromedriver, through selenium, as in the browser tests) fills the Edit tab with the
README's request and clicks Edit. Timed: from the click until the page shows the before/after table
(status "edit N (method) applied", a new N each click, and the table's edit-prompt row); the audit that the page shows afterwards is timed
on its own (`audit_s`). The first click is reported apart (`web_first_click_s`): it fills the server's
in-memory caches, later clicks reuse them, as a running app does.

CLI: `lmedit edit --model M` with the same request and, as `--probe`, the other prompts of the web table
(paraphrases, neighbours, the loud-fact prompt), so both score and generate the same rows; a fresh process
each time, as a user runs it. `cli_load_s` is `lmedit generate --max-new-tokens 1` in a fresh process (start-up
and model load), so `cli_edit_s - cli_load_s` is the CLI's own work; both ratios are printed.

Both sides use the same settings: the shipped ones for M, or `--config FILE` (typed into the page's settings
box, passed to the CLI). One untimed round of each first warms the disk caches (key statistics).

Usage: .venv/bin/python benchmarks/bench_web.py [--model gemma3-270m] [--repeat 3] [--config FILE]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import emit  # noqa: E402
from webdriver_helpers import Page, open_browser, served  # noqa: E402

REQUEST = {"edit-prompt": "{} is located in the city of", "edit-subject": "The Eiffel Tower", "edit-new": "Rome",
           "edit-true": "Paris"}


def click_edit(page: Page, timeout: float) -> tuple[float, float, list[list[str]]]:
    """Click Edit; seconds until the before/after table shows, then until the audit shows; the table's rows."""
    old = page.text("edit-status")
    page.click("edit-button")
    start = time.perf_counter()
    page.wait(lambda: " applied in " in (text := page.text("edit-status")) and text != old
              and (rows := page.table("edit-table")) and rows[0] and rows[0][0] == "edit prompt",
              "the before/after table", timeout)
    table_s = time.perf_counter() - start
    if "error" in page.text("edit-status"):
        raise SystemExit(f"the edit failed: {page.text('edit-status')}")
    page.wait(lambda: page.idle("edit-verdict") and "audit:" in page.text("edit-verdict"), "the audit", timeout)
    return table_s, time.perf_counter() - start - table_s, page.table("edit-table")


def run_cli(args: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lmedit.cli.main", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"`lmedit {' '.join(args[:2])} ...` failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--config", type=Path, help="method settings for both sides (default: the shipped ones)")
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-web-"))
    serve_args = ["--model", args.model, "--out", str(work / "out"), "--ledger", str(work / "ledger")]
    result: dict = {"benchmark": "web", "model": args.model, "repeat": args.repeat,
                    "threads": os.environ.get("OMP_NUM_THREADS", "default"),
                    "settings": str(args.config) if args.config else "shipped"}
    with served(serve_args, timeout=600, log=work / "server.log") as url:
        driver = open_browser()
        try:
            page = Page(driver, url, timeout=args.timeout)
            page.tab("Edit")
            if args.config:
                page.fill("edit-settings", args.config.read_text())
            for elem_id, value in REQUEST.items():
                page.fill(elem_id, value)
            first, audit_first, rows = click_edit(page, args.timeout)
            timed = [click_edit(page, args.timeout) for _ in range(args.repeat)]
        finally:
            driver.quit()
    probes = [row[1] for row in rows if row[0] and row[0] != "edit prompt"]
    edit = ["edit", "--model", args.model, "--prompt", REQUEST["edit-prompt"], "--subject", REQUEST["edit-subject"],
            "--target-new", REQUEST["edit-new"], "--target-true", REQUEST["edit-true"],
            *(["--config", str(args.config)] if args.config else []), *[a for p in probes for a in ("--probe", p)]]
    run_cli(edit)  # warm the disk caches
    cli = [run_cli(edit) for _ in range(args.repeat)]
    load = [run_cli(["generate", "--model", args.model, "--max-new-tokens", "1", "x"]) for _ in range(args.repeat)]
    web = [t for t, _, _ in timed]
    result.update(
        rows=len(probes) + 1, web_first_click_s=round(first, 2), web_click_to_table_s=[round(t, 2) for t in web],
        audit_s=[round(a, 2) for _, a, _ in [(first, audit_first, rows), *timed]],
        cli_edit_s=[round(t, 2) for t in cli], cli_load_s=round(statistics.median(load), 2))
    web_median, cli_median = statistics.median(web), statistics.median(cli)
    result["web_median_s"], result["cli_median_s"] = round(web_median, 2), round(cli_median, 2)
    result["ratio_web_to_cli"] = round(web_median / cli_median, 3)
    own = cli_median - result["cli_load_s"]
    result["ratio_web_to_cli_without_load"] = round(web_median / own, 3) if own > 0 else None
    result["target"] = "ratio_web_to_cli <= 1.2"
    emit(result)


if __name__ == "__main__":
    main()
