"""The web app's browser flow on the default model (slow): `lmedit serve` on gemma3-270m in headless Chromium.

The same flow as the tiny-model test (`tests/unit/web/test_web_browser.py`, `webdriver_helpers.run_flow`)
with the shipped settings and the audit gate's default thresholds: trace the Space Needle, a refused request,
the README's Eiffel Tower → Rome edit by the default method with its audit, undo, the edit recorded through
the gate (which takes the Edit tab's audit) and reverted in the Ledger tab. Generations are short (4 tokens,
in the table and in the audits' fluency check) and the trace takes one noise sample: on one core the audits'
measurements are most of the time (step times are benchmarks/bench_web.py's job). It takes a screenshot of
each tab: into `$LMEDIT_WEB_SCREENSHOTS` when set (`LMEDIT_WEB_SCREENSHOTS=docs/figures` refreshes the
README's), else into the test's temporary directory. The Compare tab (two methods, their audits: about 20 s
here) runs on the tiny model in `make test`, and here too when screenshots are asked for.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from webdriver_helpers import Page, open_browser, require_browser, run_flow, served

pytestmark = pytest.mark.slow


def test_the_web_flow_on_the_default_model(tmp_path):
    require_browser()
    asked = os.environ.get("LMEDIT_WEB_SCREENSHOTS")
    shots = Path(asked or tmp_path / "screenshots")
    compare = ("ft", "ft_l") if asked else ()
    # Run from tmp_path with relative paths: the pages (and screenshots) show "ledgers/gemma", not a temporary path.
    # Short generations (4 tokens in the table and in the audits' fluency check) and one noise sample keep the
    # run short: the audits measure every probe twice, which is most of the time on one core.
    args = ["--model", "gemma3-270m", "--out", "out", "--ledger", "ledgers/gemma", "--max-new-tokens", "4",
            "--audit-set", "generation_tokens=4"]
    with ThreadPoolExecutor(1) as pool:
        browser = pool.submit(open_browser)  # chromium starts while the model loads
        try:
            with served(args, env={"GRADIO_TEMP_DIR": str(tmp_path / "gradio")}, log=tmp_path / "server.log",
                        timeout=300, cwd=tmp_path) as url:
                seen = run_flow(Page(browser.result(), url), n_layers=18, samples=1, compare=compare,
                                trace={"trace-prompt": "The Space Needle is in downtown",
                                       "trace-subject": "The Space Needle"},
                                edit={"edit-prompt": "{} is located in the city of", "edit-subject": "The Eiffel Tower",
                                      "edit-new": "Rome", "edit-true": "Paris"},
                                neighbour="The Louvre is located in the city of = Paris", screenshots=shots,
                                timeout=240)
        finally:
            browser.result().quit()
    assert "answer 'Seattle'" in str(seen["trace"]), seen["trace"]
    assert "audit: keep" in str(seen["verdict"]) or "audit: warn" in str(seen["verdict"]), seen["verdict"]
    for tab in ("trace", "edit", "ledger") + (("compare",) if compare else ()):
        assert (shots / f"web_{tab}.png").stat().st_size > 20_000
