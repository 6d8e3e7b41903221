"""lm-eval on Engram models, offline: MMLU, BBH, HumanEval, MATH and RULER from a local data
directory, resident or offloaded tables, with Engram masked or not.

* ``data``: the data directory (``--data-dir`` / ``$ENGRAM_HF_EVAL_DATA``), its layout, and imports
  (``prepare_from_dir``); ``hub``: ``prepare_from_hub`` for machines that can reach the hub.
* ``suite``: every task and group, what each needs, and the lm-eval YAMLs in ``tasks/``.
* ``mmlu``, ``bbh``, ``humaneval``, ``minerva``, ``ruler``: each benchmark's data loading and scoring.
* ``lm``: ``EngramLM``, lm-eval's ``HFLM`` registered as model ``engram`` (``engram_mask``, offload).
* ``runner``: ``run_eval(EvalSpec(...))``, the engine of ``engram-hf eval``; ``report``: tables, model card.

lm-eval itself is imported only by ``lm``, ``runner`` and the tasks, so importing this package is cheap.
"""

from pathlib import Path

from .data import DATA_ENV, MissingEvalData, prepare_from_dir, resolve_data_dir

TASKS_DIR = Path(__file__).resolve().parent / "tasks"

__all__ = ["DATA_ENV", "MissingEvalData", "TASKS_DIR", "prepare_from_dir", "resolve_data_dir"]
