"""The web app end to end in headless Chromium, on a tiny random model (`lmedit serve --model DIR`).

One server and one browser for the module: the browser starts while the server loads. The flow
(`webdriver_helpers.run_flow`) traces a fact, sends a request the library refuses, edits with quick ROME
settings typed into the settings box, undoes, compares two methods, records the edit through the ledger's
gate and reverts it in the Ledger tab, asserting on the numbers, images and messages each tab shows.
Then a trace clicked while an edit runs waits in the queue, which the page shows. The audit gate is
lenient (every threshold off): a random model's neighbours are wrong before any edit.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from webdriver_helpers import Page, open_browser, require_browser, run_flow, served

from lmedit.ledger.audit import CHECKS
from lmedit.testing import TINY_CORPUS

QUICK_ROME = "layer: 1\ncorpus: file:{corpus}\ncorpus_tokens: 2000\nprefixes_short: 2\nprefixes_long: 1\n"


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    require_browser()
    from lmedit.testing import tiny_lm

    root = tmp_path_factory.mktemp("web")
    lm = tiny_lm("llama")
    lm.model.save_pretrained(root / "tiny-llama")
    lm.tokenizer.save_pretrained(root / "tiny-llama")
    (root / "corpus.txt").write_text("\n\n".join(TINY_CORPUS * 40))
    lenient = root / "audit.yaml"
    lenient.write_text("".join(f"{c.name}_{level}: null\n" for c in CHECKS for level in ("warn", "refuse"))
                       + "generation_tokens: 4\n")
    args = ["--model", str(root / "tiny-llama"), "--out", str(root / "out"), "--ledger", str(root / "ledger"),
            "--audit-config", str(lenient), "--max-new-tokens", "4"]
    env = {"LMEDIT_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1", "GRADIO_TEMP_DIR": str(root / "gradio")}
    with ThreadPoolExecutor(1) as pool:
        browser = pool.submit(open_browser)  # chromium starts while the server loads
        try:
            with served(args, env=env, log=root / "server.log") as url:
                yield Page(browser.result(), url), root
        finally:
            browser.result().quit()


def test_trace_edit_undo_compare_and_revert_in_the_browser(page):
    page, root = page
    seen = run_flow(page, n_layers=4, samples=2, compare=("ft", "ft_l"),
                    trace={"trace-prompt": "Where is The Eiffel Tower", "trace-subject": "The Eiffel Tower"},
                    edit={"edit-prompt": "Where is {}", "edit-subject": "The Eiffel Tower", "edit-new": "Rome",
                          "edit-true": "Paris"},
                    settings=QUICK_ROME.format(corpus=root / "corpus.txt"), neighbour="Where is The Louvre = Paris")
    assert "lmedit ships no" not in str(seen["verdict"])
    assert list((root / "out" / "patches").glob("*.lmpatch")) and list((root / "out" / "traces").glob("*_mlp.json"))


def test_a_second_job_waits_in_the_queue_and_shows_its_place(page):
    page, root = page
    page.tab("Edit")
    page.fill("edit-settings", QUICK_ROME.format(corpus=root / "corpus.txt") + "v_steps: 250\n")  # a second or two
    page.click("edit-button")
    page.tab("Trace")
    page.click("trace-button")  # while the edit runs: one model job at a time
    page.wait(lambda: "queue: 1/1" in page.element("trace-status").text, "the trace's place in the queue", 10)
    assert "clean p=" in page.wait_text("trace-status", r"clean p=|error", "the queued trace")
    page.tab("Edit")
    assert " applied in " in page.wait_text("edit-status", r"edit 2 \(rome\) applied|error", "the edit")


def test_a_missing_chromium_fails_saying_make_test_installs_it(monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception, match=r"chromium, chromedriver not found\): `make test` installs it"):
        require_browser()
