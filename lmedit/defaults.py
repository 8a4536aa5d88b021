"""The defaults lmedit names once: the model and the editing method used when none is given.

This module imports nothing, so the CLI can show them in `--help` without importing torch.
`lmedit.models.load.DEFAULT_MODEL` and `lmedit.editors.DEFAULT_METHOD` are these same constants.
"""

from __future__ import annotations

# The built-in model `lmedit.load()` and every `--model` option use when none is named.
DEFAULT_MODEL = "gemma3-270m"

# The method `lmedit edit` and `lmedit.edit` use when none is named.
DEFAULT_METHOD = "rome"
