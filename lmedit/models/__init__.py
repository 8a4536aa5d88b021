"""Model loading (`lmedit.models.load`) and the per-architecture table (`lmedit.models.arch`).

`lmedit.load` is the public entry point; this package does not re-export it so that
`lmedit.models.load` keeps naming the module.
"""

from lmedit.models.arch import ARCHS, ArchSpec, get_arch

__all__ = ["ARCHS", "ArchSpec", "get_arch"]
