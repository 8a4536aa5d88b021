"""`lmedit serve`: the web app (trace, edit, compare, ledger) on one model, in a browser.

Needs the `web` extra (`pip install 'lmedit[web]'`: Gradio). Binds to 127.0.0.1 unless `--host` says
otherwise, and then prints a warning: anyone who reaches the port can edit the served model and write
under `--out`. One model is loaded; one trace, edit or comparison runs at a time, others wait in a queue.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from pathlib import Path

from lmedit.cli.common import add_model_args, console, load_model
from lmedit.cli.ledger_common import DEFAULT_LEDGER, add_audit_args, audit_config
from lmedit.errors import MissingDependencyError, ServeError

EPILOG = """examples:
  lmedit serve                                   # the default model on http://127.0.0.1:7860
  lmedit serve --model smollm2-135m --port 8000 --ledger ledgers/smollm
  lmedit serve --host 0.0.0.0                    # reachable from other machines (prints a warning)
  lmedit serve --audit-set neighborhood_refuse=0.8 # the audit gate's thresholds, as for `lmedit edit --ledger`
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="the web app: trace, edit, compare and audit in a browser",
                              description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: 127.0.0.1, this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--ledger", "-l", default=os.environ.get("LMEDIT_LEDGER", DEFAULT_LEDGER), metavar="PATH",
                   help=f"ledger the app records edits in (default: $LMEDIT_LEDGER or ./{DEFAULT_LEDGER}; created on "
                        "the first recorded edit; its applied edits are put on the model)")
    p.add_argument("--out", "-o", type=Path, default=Path("lmedit-web"),
                   help="directory for traces, saved edits, patches and exported models (default: lmedit-web)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per probe in the Edit tab")
    add_audit_args(p)
    p.set_defaults(run=run)


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_address(host: str, port: int) -> None:
    """Refuse a port out of range, taken, or a host that is not an address of this machine, before the model loads.

    Raises:
        ServeError: naming the host and port and what to do.
    """
    if not 1 <= port <= 65535:
        raise ServeError(f"--port {port}: expected 1 to 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ServeError(f"--host {host}: not an address of this machine ({exc.strerror})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As the server will: a port a closed server left in TIME_WAIT is free, one with a listener is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ServeError(f"cannot listen on {host}:{port} ({exc.strerror}): another server (an `lmedit serve`?) "
                             "may hold the port; choose another with --port") from None


def run(args: argparse.Namespace) -> int:
    check_address(args.host, args.port)
    gate = audit_config(args)  # a bad --audit-set is reported before anything loads
    if not is_loopback(args.host):
        print(f"warning: serving on {args.host}, not only on this machine: anyone who can reach port {args.port} "
              f"can edit the served model and write files under {args.out}", file=sys.stderr, flush=True)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline: no usage reports, no version checks
    try:
        from lmedit.web.app import launch
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in ("gradio", "fastapi", "uvicorn"):
            raise MissingDependencyError("`lmedit serve` needs the web extra: pip install 'lmedit[web]'") from None
        raise
    from lmedit.web.session import Session

    lm = load_model(args)
    session = Session(lm, out_dir=args.out, ledger=args.ledger, max_new_tokens=args.max_new_tokens, audit_config=gate)
    demo = launch(session, args.host, args.port)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    console.print(f"lmedit web app on http://{shown}:{args.port} (model {lm.name}; files in {session.out_dir}); "
                  "Ctrl-C stops it", markup=False, highlight=False)
    try:
        demo.block_thread()
    finally:
        demo.close()
    return 0
