"""`lmedit serve` before it serves: refusals are one `error:` line with status 2 and come before the model
loads (a taken port, a bad port or host, a bad audit threshold, no Gradio); a host other than loopback is
announced; `--help` imports neither Gradio nor torch."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from lmedit.cli import serve
from lmedit.cli.main import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _no_model_load(monkeypatch):
    def refuse(args):
        raise AssertionError("the model must not load")
    monkeypatch.setattr(serve, "load_model", refuse)


def test_a_taken_port_is_refused_before_the_model_loads(monkeypatch, capsys):
    _no_model_load(monkeypatch)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot listen on 127.0.0.1:{port}") and "--port" in err and err.count("\n") == 1


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "error: --port 70000: expected 1 to 65535"),
    (["--host", "no-such-host.invalid"], "error: --host no-such-host.invalid: not an address of this machine"),
    (["--audit-set", "efficacy_warn=high"], "efficacy_warn"),
])
def test_bad_addresses_and_settings_are_one_line(monkeypatch, capsys, args, message):
    _no_model_load(monkeypatch)
    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1


def test_missing_gradio_names_the_extra(monkeypatch, capsys):
    _no_model_load(monkeypatch)
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "lmedit.web.app", raising=False)
    assert main(["serve", "--port", str(_free_port())]) == 2
    assert capsys.readouterr().err == "error: `lmedit serve` needs the web extra: pip install 'lmedit[web]'\n"


def test_a_host_other_than_loopback_is_announced(monkeypatch, capsys):
    _no_model_load(monkeypatch)
    monkeypatch.setitem(sys.modules, "gradio", None)  # stop right after the warning, before anything loads
    monkeypatch.delitem(sys.modules, "lmedit.web.app", raising=False)
    port = str(_free_port())
    assert main(["serve", "--host", "0.0.0.0", "--port", port]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"warning: serving on 0.0.0.0, not only on this machine: anyone who can reach port {port}")
    assert "error: `lmedit serve` needs the web extra" in err
    assert main(["serve", "--port", port]) == 2 and "warning" not in capsys.readouterr().err
    assert [serve.is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "0.0.0.0", "192.168.1.2")] == \
        [True, True, True, False, False]


def test_serve_help_imports_neither_gradio_nor_torch():
    code = ("import sys; from lmedit.cli.main import main; main(['serve', '--help']); "
            "print([m for m in ('gradio', 'torch', 'lmedit.web.app') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "lmedit serve" in done.stdout and "--host" in done.stdout and done.stdout.rstrip().endswith("[]")
