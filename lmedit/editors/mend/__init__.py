"""MEND (Mitchell et al. 2021, "Fast Model Editing at Scale", arXiv:2110.11309): a trained editor network.

config.py (`MendConfig`), network.py (the (u, δ) → (ũ, δ̃) network and its checkpoint file), editor.py
(`MendEditor`, registered as "mend", and the forward passes), train.py (meta-training). See docs/mend.md.
"""

from lmedit.editors.mend.config import MendConfig
from lmedit.editors.mend.editor import MendEditor

__all__ = ["MendConfig", "MendEditor"]
