"""SERAC (Mitchell et al. 2022, "Memory-Based Model Editing at Scale", arXiv:2206.06520): the method's only home.

config.py   SeracConfig
scope.py    sentence encoders, the scope classifier head, its training and calibration
memory.py   memory entries, `SeracEdit` (a WrapperEdit), the `Memory` list/add/remove view
editor.py   `SeracEditor`, registered as "serac"
"""

from lmedit.editors.serac.config import SeracConfig
from lmedit.editors.serac.editor import SeracEditor
from lmedit.editors.serac.memory import Memory, MemoryEntry, SeracEdit
from lmedit.editors.serac.scope import LexicalEncoder, MiniLMEncoder, ScopeHead, edit_statement, load_encoder

__all__ = ["LexicalEncoder", "Memory", "MemoryEntry", "MiniLMEncoder", "ScopeHead", "SeracConfig", "SeracEdit",
           "SeracEditor", "edit_statement", "load_encoder"]
