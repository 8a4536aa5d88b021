"""Drive the web app (`lmedit serve`) in headless Chromium through selenium, for the browser tests.

`served(...)` starts `lmedit serve` on a free port in a subprocess and waits until it answers; `open_browser()`
starts Debian's chromium through its chromedriver (no Selenium Manager, no download); `Page` fills the
app's fields, clicks its buttons and waits for what a tab shows. Elements are found by the `elem_id`s the
app gives its components (`lmedit/web/app.py`).

Chromium missing is a failure, not a skip: `make test` installs it (`apt-get install -y chromium
chromium-driver` as root), so a machine without it is not set up the way the README says.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

MISSING = ("headless Chromium is missing ({what} not found): `make test` installs it (`apt-get install -y chromium "
           "chromium-driver`, as root) and the web extra (`pip install -e '.[web]'`: gradio, selenium)")


def require_browser() -> tuple[str, str]:
    """The chromium and chromedriver paths; fails the test (never skips) when either is missing."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", chromium), ("chromedriver", driver)) if path is None]
    try:
        import gradio  # noqa: F401
        import selenium  # noqa: F401
    except ModuleNotFoundError as exc:
        missing.append(f"python package {exc.name}")
    if missing:
        pytest.fail(MISSING.format(what=", ".join(missing)), pytrace=False)
    return chromium, driver  # type: ignore[return-value]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def served(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 120.0,
           log: Path | None = None, cwd: Path | None = None) -> Iterator[str]:
    """`lmedit serve ARGS --port FREE` in a subprocess (in `cwd`); yields its URL once the page answers, stops it
    after."""
    port = free_port()
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115  (closed below)
    proc = subprocess.Popen([sys.executable, "-m", "lmedit.cli.main", "serve", *args, "--port", str(port)],
                            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=cwd)
    url = f"http://127.0.0.1:{port}/"
    try:
        for _ in range(int(timeout / 0.3) + 1):  # polls, 0.3 s apart: no clock is read
            if proc.poll() is not None:
                text = log.read_text()[-3000:] if log else ""
                pytest.fail(f"`lmedit serve` exited with {proc.returncode} before answering:\n{text}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.3)
        else:
            pytest.fail(f"`lmedit serve` did not answer on {url} within about {timeout:.0f} s")
        yield url
    finally:
        proc.terminate()  # SIGTERM: the server holds nothing that needs a clean shutdown
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if log:
            out.close()  # type: ignore[union-attr]


def open_browser(width: int = 1400, height: int = 1600):
    """Headless Debian chromium through its own chromedriver (matching versions, nothing downloaded)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = require_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--disable-extensions", "--no-first-run", f"--window-size={width},{height}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options)


# Sets a field's value the way typing does, so the page's framework sees an `input` event.
_SET_VALUE = """
const el = arguments[0];
const setter = Object.getOwnPropertyDescriptor(Object.getPrototypeOf(el), 'value').set;
setter.call(el, arguments[1]);
el.dispatchEvent(new Event('input', {bubbles: true}));
el.dispatchEvent(new Event('change', {bubbles: true}));
"""


class Page:
    """The app in a browser: tabs, fields and buttons by the app's `elem_id`s."""

    def __init__(self, driver, url: str, timeout: float = 60.0) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.timeout = driver, timeout
        self._wait = WebDriverWait
        driver.get(url)
        self.wait(lambda: driver.find_elements("css selector", "#trace-button"), "the app's page to load")

    def wait(self, condition: Callable[[], object], what: str, timeout: float | None = None):
        from selenium.common.exceptions import StaleElementReferenceException, TimeoutException

        def check(_):
            try:
                return condition()
            except StaleElementReferenceException:
                return False

        try:
            return self._wait(self.driver, timeout or self.timeout, poll_frequency=0.1).until(check)
        except TimeoutException:
            raise AssertionError(f"timed out waiting for {what}") from None

    def element(self, elem_id: str):
        return self.driver.find_element("css selector", f"#{elem_id}")

    def tab(self, name: str) -> None:
        button = self.driver.find_element("xpath", f"//button[@role='tab' and normalize-space()='{name}']")
        button.click()
        self.wait(lambda: button.get_attribute("aria-selected") == "true", f"the {name} tab")

    def fill(self, elem_id: str, value: str) -> None:
        field = self.element(elem_id).find_element("css selector", "textarea, input")
        self.driver.execute_script(_SET_VALUE, field, value)

    def click(self, elem_id: str) -> None:
        self.element(elem_id).click()

    def choose(self, elem_id: str, label: str) -> None:
        """Click the radio button or checkbox labelled `label` inside component `elem_id`."""
        self.element(elem_id).find_element(
            "xpath", f".//label[.//*[normalize-space()='{label}'] or normalize-space()='{label}']").click()

    def text(self, elem_id: str) -> str:
        """What component `elem_id` shows: an app status line's text when it has one (Gradio's progress
        overlay left out), else all its visible text."""
        found = self.element(elem_id).find_elements("css selector", ".lmedit-status")
        return found[0].text if found else self.element(elem_id).text

    def idle(self, elem_id: str) -> bool:
        """Whether component `elem_id` shows no queue position or progress (its job, if any, is over)."""
        trackers = self.element(elem_id).find_elements("css selector", "[data-testid=status-tracker]")
        return all("hide" in (t.get_attribute("class") or "").split() for t in trackers)

    def wait_text(self, elem_id: str, pattern: str, what: str = "", timeout: float | None = None) -> str:
        """Wait until component `elem_id` is idle and shows text matching the regex `pattern`; returns its text."""
        self.wait(lambda: self.idle(elem_id) and re.search(pattern, self.text(elem_id)),
                  what or f"{pattern!r} in #{elem_id}", timeout)
        return self.text(elem_id)

    def run(self, button: str, elem_id: str, pattern: str, what: str, timeout: float | None = None) -> str:
        """Click `button`, then wait until `elem_id` is idle and shows a *new* text matching `pattern`."""
        old = self.text(elem_id)
        self.click(button)
        self.wait(lambda: self.idle(elem_id) and (text := self.text(elem_id)) != old and re.search(pattern, text),
                  what, timeout)
        return self.text(elem_id)

    def images(self, elem_id: str) -> list[str]:
        """The `src` of the images component `elem_id` shows (empty while it shows none)."""
        return [img.get_attribute("src") for img in self.element(elem_id).find_elements("css selector", "img")
                if img.get_attribute("src") and img.get_attribute("naturalWidth") not in (None, "0")]

    def table(self, elem_id: str) -> list[list[str]]:
        """The body rows of the Dataframe `elem_id`, as cell texts (Gradio's grid rows; its hidden sizing
        table is skipped; rows scrolled out of a tall table's viewport are not rendered, hence not here)."""
        return self.driver.execute_script("""
            return Array.from(arguments[0].querySelectorAll('.virtual-body [role=row]')).map(
                row => Array.from(row.querySelectorAll('[role=gridcell]')).map(c => c.textContent.trim()));
        """, self.element(elem_id))

    def wait_table(self, elem_id: str, what: str, timeout: float | None = None) -> list[list[str]]:
        """Wait until the Dataframe `elem_id` has a non-empty first cell; returns its rows."""
        self.wait(lambda: (rows := self.table(elem_id)) and rows[0] and rows[0][0], what, timeout)
        return self.table(elem_id)

    def screenshot(self, path: Path) -> Path:
        """The whole page (the window is resized to its height first)."""
        height = self.driver.execute_script("return document.documentElement.scrollHeight")
        width = self.driver.get_window_size()["width"]
        self.driver.set_window_size(width, max(800, min(int(height) + 40, 6000)))
        path.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))
        return path


# ---- the flow both browser tests drive (tiny model; the default model in tests/slow) --------------------

EIFFEL = {"edit-prompt": "{} is located in the city of", "edit-subject": "The Eiffel Tower", "edit-new": "Rome",
          "edit-true": "Paris"}


def _number(pattern: str, text: str) -> float:
    found = re.search(pattern, text)
    assert found, f"{pattern!r} not in {text!r}"
    return float(found.group(1))


def _compare(page: Page, edit: dict[str, str], compare: tuple[str, ...], timeout: float, seen: dict[str, object],
             shot) -> None:
    """The Compare tab: the edit's request by each of `compare`'s methods, one table and one chart."""
    page.tab("Compare")
    for elem_id, value in edit.items():
        page.fill(elem_id.replace("edit-", "compare-"), value)
    for label in page.element("compare-methods").find_elements("css selector", "input:checked"):
        label.click()  # start from none chosen
    for method in compare:
        page.choose("compare-methods", method)
    text = page.run("compare-button", "compare-status", r"compared|error", "the comparison", timeout)
    assert f"compared {len(compare)} method(s)" in text and "failed" not in text, text
    table = {row[0]: row for row in page.wait_table("compare-table", "the comparison table")}
    assert set(compare) <= set(table) and "(before the edit)" in table, table
    for method in compare:
        assert re.fullmatch(r"[01]\.\d{3}", table[method][1]) and float(table[method][6]) > 0, table[method]
    page.wait(lambda: page.images("compare-chart"), "the comparison chart")
    seen["compare"] = table
    shot("compare")


def run_flow(page: Page, *, n_layers: int, trace: dict[str, str], edit: dict[str, str], compare: tuple[str, ...],
             settings: str | None = None, neighbour: str = "", samples: int = 2,
             screenshots: Path | None = None, timeout: float = 120.0) -> dict[str, object]:
    """Trace, a refused request, an edit with its audit, undo, a comparison of two methods, recording the
    edit in the ledger and reverting it there, asserting on what each tab shows. Returns what it read.

    Args:
        trace / edit: field values by elem_id (the Trace tab's prompt and subject; the Edit tab's request).
        compare: the methods the Compare tab compares (empty: that step is skipped).
        settings: YAML replacing the Edit tab's settings (None: keep the shipped settings it shows).
        screenshots: where to save a PNG of each tab (None: none).
    """
    seen: dict[str, object] = {}
    def shot(name: str) -> None:
        if screenshots is not None:
            page.screenshot(screenshots / f"web_{name}.png")

    # Trace: three heatmaps, the suggested layer, JSON + PNG downloads.
    for elem_id, value in trace.items():
        page.fill(elem_id, value)
    page.fill("trace-samples", str(samples))
    text = page.run("trace-button", "trace-status", r"clean p=|error", "the trace", timeout)
    assert "error" not in text, text
    layer = int(_number(r"suggested layer (\d+)", text))
    assert 0 <= layer < n_layers and 0 <= _number(r"clean p=([\d.]+)", text) <= 1
    for kind in ("resid", "mlp", "attn"):
        page.wait(lambda kind=kind: page.images(f"trace-{kind}"), f"the {kind} heatmap")
    files = page.text("trace-files")
    assert files.count(".json") == 3 and files.count(".png") == 3, files
    seen["trace"] = text
    shot("trace")

    # Edit: a request the library refuses shows its message, not a traceback.
    page.tab("Edit")
    if settings is not None:
        page.fill("edit-settings", settings)
    else:
        assert "shipped for" in page.text("edit-settings-source"), page.text("edit-settings-source")
    for elem_id, value in edit.items():
        page.fill(elem_id, value.replace("{}", "") if elem_id == "edit-prompt" else value)
    error = page.run("edit-button", "edit-status", r"error", "the refused request")
    assert "exactly one '{}'" in error and "Traceback" not in page.driver.page_source, error
    seen["error"] = error

    # Edit: before/after table, then the audit.
    page.fill("edit-prompt", edit["edit-prompt"])
    if neighbour:
        page.fill("edit-neighbours", neighbour)
    text = page.run("edit-button", "edit-status", r"edit \d+ \(.*\) applied|error", "the before/after table", timeout)
    assert "error" not in text, text
    before, after = (_number(p, text) for p in (r"edit prompt: ([\d.e+-]+) →", r"→ ([\d.e+-]+)"))
    assert after > before, text
    rows = page.wait_table("edit-table", "the before/after table")
    groups = {row[0] for row in rows}
    assert {"edit prompt", "paraphrase", "neighbour", "loud fact (Specificity+)"} <= groups, groups
    assert any(edit["edit-new"] in row[2] for row in rows) and all(len(row) == 7 for row in rows)
    verdict = page.wait_text("edit-verdict", r"audit: |error", "the audit", timeout)
    assert re.search(r"audit: (keep|warn|refuse)", verdict), verdict
    checks = {row[0]: row for row in page.wait_table("edit-checks", "the audit checks")}
    assert checks["efficacy"][1] == "1.000", checks["efficacy"]
    assert "1 unrecorded" in page.text("model-state")
    seen.update(edit=text, verdict=verdict)
    shot("edit")

    # Undo: the edit prompt's probability is back to its value before the edit.
    text = page.run("edit-undo", "edit-status", r"undone|error", "the undo")
    assert "(the same as before the edit" in text, text
    assert "unrecorded" not in page.text("model-state")

    # Compare: two methods, one table and one chart.
    if compare:
        _compare(page, edit, compare, timeout, seen, shot)

    # Record the (undone) edit through the ledger's gate, then look at it in the Ledger tab and revert it.
    page.tab("Edit")
    text = page.run("edit-record-button", "edit-status", r"recorded as edit|refused|error", "the record", timeout)
    edit_id = int(_number(r"recorded as edit (\d+)", text))
    assert "applied edit" in page.text("model-state")
    page.tab("Ledger")
    page.run("ledger-refresh", "ledger-status", r"edit\(s\) in", "the ledger's list")
    rows = {row[0]: row for row in page.wait_table("ledger-table", "the ledger table")}
    assert rows[str(edit_id)][1] == "applied", rows
    page.fill("ledger-id", str(edit_id))
    page.run("ledger-show", "ledger-status", r"audit: ", "the stored audit")
    page.wait(lambda: page.images("ledger-plot"), "the audit plot")
    assert ".lmpatch" in page.run("ledger-patch", "ledger-status", r"patch written|error", "the patch export")
    shot("ledger")
    text = page.run("ledger-revert", "ledger-status", r"reverted|error", "the revert", timeout)
    assert f"reverted edit {edit_id}" in text, text
    page.wait(lambda: {r[0]: r for r in page.table("ledger-table")}.get(str(edit_id), [""] * 2)[1] == "reverted",
              "the reverted row")
    assert "0 applied edits" in page.text("model-state")
    return seen
