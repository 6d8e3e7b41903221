"""Knowledge correction by editing Engram memory rows: locate, edit, patch, revert, measure.

* ``locate(model, tokenizer, text, corpus=None)``: which rows every position reads, their n-grams,
  the gates, and which other corpus contexts share each row (``CorpusIndex``).
* ``EngramEditor(model, tokenizer).edit(requests)``: optimise only the rows a fact's n-grams
  address; returns an ``EditResult`` with an ``EngramPatch``.
* ``EngramPatch``: apply / revert (bit-identical) / save / load / stack; ``apply_to_checkpoint``
  writes a patched copy of a checkpoint without loading its tables.
* ``evaluate_edit``: efficacy, generalisation, locality (exact where no edited row is read), fluency.
"""

from .editor import EditRequest, EditResult, EngramEditor, RequestReport
from .evaluate import EditEvaluation, evaluate_edit
from .locate import CorpusIndex, Location, locate
from .patch import EngramPatch, PatchMismatchError, apply_to_checkpoint
from .rows import EditInputError, RowSet

__all__ = [
    "locate",
    "Location",
    "CorpusIndex",
    "EngramEditor",
    "EditRequest",
    "EditResult",
    "RequestReport",
    "EngramPatch",
    "PatchMismatchError",
    "apply_to_checkpoint",
    "evaluate_edit",
    "EditEvaluation",
    "EditInputError",
    "RowSet",
]
