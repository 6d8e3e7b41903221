"""``python -m engram_hf.evaluation ...``: lm-eval's own command line, with the ``engram`` model
registered and the offline tasks on the include path::

    python -m engram_hf.evaluation run --model engram \\
        --model_args pretrained=DIR,engram_offload=disk,engram_mask=True --tasks offline_mmlu
"""

import sys

from . import lm  # noqa: F401  (registers the lm-eval model "engram")
from .suite import TASKS_DIR


def main(argv=None) -> None:
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--include_path" not in argv and not any(a.startswith("--include_path=") for a in argv):
        argv += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
