"""The lmedit web app (`lmedit serve`, `pip install 'lmedit[web]'`): trace, edit, compare and audit in a browser.

Modules:
  inputs.py   every form field checked and bounded (plain Python)
  tables.py   what the pages show: before/after, audit, Compare and Ledger tables, status lines (plain Python)
  charts.py   the Compare tab's chart (matplotlib)
  session.py  the one model, its ledger and pending edit; calls only lmedit's public API
  app.py      the Gradio pages and their handlers (imports gradio)

Like the CLI, the app is thin: it parses, calls `lmedit.*`, renders, and never names an editing method.
Importing this package imports neither Gradio nor torch.
"""
