"""BIG-Bench Hard from the data directory, few-shot with and without chain of thought.

The three exemplars of each task are the official ones (``cot-prompts/<task>.txt`` of the BBH
repository, parsed by ``parse_cot_prompt``) and are written into the task YAMLs: chain-of-thought
tasks show the reasoning, direct tasks only its final answer. Scoring is exact match (case
sensitive, as the official evaluation) of the answer extracted from the generation:

* CoT: the text after the first "the answer is" up to the end of that line, without a final period
  (lm-eval's regex ``(?<=the answer is )(.*)(?=.)`` does the same on well-formed chains; ours also
  takes "The answer is" and an answer at the very end of the generation);
* direct: the first line of the generation, stripped, without a final period.

Generation stops at a blank line or "Q:" (lm-eval stops at any capital Q, which cuts chains that
mention, say, a Queen).
"""

from __future__ import annotations

import re

from . import data

COT_CUE = "Let's think step by step."
INVALID = "[invalid]"
_ANSWER = re.compile(r"the answer is\s*(.*)", re.IGNORECASE)


def parse_cot_prompt(text: str) -> tuple[str, list[dict]]:
    """The description and the exemplars ``{input, target (the chain), answer}`` of an official
    BBH ``cot-prompts`` file."""
    paragraphs = text.split("\n-----\n")[-1].strip("\n").split("\n\n")
    first = next((i for i, p in enumerate(paragraphs) if p.startswith("Q: ")), len(paragraphs))
    description, shots = "\n\n".join(paragraphs[:first]), paragraphs[first:]
    exemplars = []
    for shot in shots:
        if not shot.startswith("Q: ") or f"\nA: {COT_CUE}" not in shot:
            raise ValueError(f"Not a BBH chain-of-thought exemplar: {shot[:80]!r}...")
        question, chain = shot[3:].split(f"\nA: {COT_CUE}", 1)
        chain = chain.lstrip("\n")
        answer = cot_answer(chain)
        if answer == INVALID:
            raise ValueError(f"The exemplar's chain states no answer: {chain[-80:]!r}")
        exemplars.append({"input": question, "target": chain, "answer": answer})
    return description, exemplars


def cot_answer(text: str) -> str:
    m = _ANSWER.search(text)
    if not m:
        return INVALID
    answer = m.group(1).strip()
    return answer[:-1].rstrip() if answer.endswith(".") else answer


def direct_answer(text: str) -> str:
    lines = text.strip().splitlines()
    answer = lines[0].strip() if lines else ""
    return answer[:-1].rstrip() if answer.endswith(".") else answer


def cot_filter(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval custom filter: each generation -> its extracted answer."""
    return [[cot_answer(r) for r in rs] for rs in resps]


def direct_filter(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    return [[direct_answer(r) for r in rs] for rs in resps]


def dataset(bbh_task: str, task: str | None = None, data_dir=None, **_metadata):
    """lm-eval ``custom_dataset`` entry: the task's examples as the test split."""
    import datasets

    if bbh_task not in data.BBH_TASKS:
        raise ValueError(f"Unknown BBH task {bbh_task!r}.")
    path = data.require(data.bbh_file(bbh_task), task or f"offline_bbh_{bbh_task}", data_dir)
    return {"test": datasets.Dataset.from_list(data.bbh_examples(path))}
