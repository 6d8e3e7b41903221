"""MATH and MATH500 from the data directory, Minerva-style (Lewkowycz et al., 2022): 4-shot
"Problem: ... Solution:" prompts, greedy generation until the next "Problem:", scored by exact match
of the normalised final answer (sympy equivalence) and by ``math-verify``'s symbolic equivalence.

The prompt and scoring are lm-eval's ``minerva_math``; both are pinned here (``FEWSHOT`` below and
``minerva_scoring``) because older lm-eval releases differ (0.4.10 mangles a LaTeX line break in two
exemplars and mis-scores 28 of MATH500's gold answers), so results do not depend on the installed lm-eval.
"""

from __future__ import annotations

from . import data, minerva_scoring

FEWSHOT = [
    {
        "problem": "Find the domain of the expression  $\\frac{\\sqrt{x-2}}{\\sqrt{5-x}}$.",
        "solution": "The expressions inside each square root must be non-negative. Therefore, $x-2 \\ge 0$, so $x\\ge2$, and $5 - x \\ge 0$, so $x \\le 5$. Also, the denominator cannot be equal to zero, so $5-x>0$, which gives $x<5$. Therefore, the domain of the expression is $\\boxed{[2,5)}$.\nFinal Answer: The final answer is $[2,5)$. I hope it is correct.",
        "few_shot": "1",
    },
    {
        "problem": "If $\\det \\mathbf{A} = 2$ and $\\det \\mathbf{B} = 12,$ then find $\\det (\\mathbf{A} \\mathbf{B}).$",
        "solution": "We have that $\\det (\\mathbf{A} \\mathbf{B}) = (\\det \\mathbf{A})(\\det \\mathbf{B}) = (2)(12) = \\boxed{24}.$\nFinal Answer: The final answer is $24$. I hope it is correct.",
        "few_shot": "1",
    },
    {
        "problem": "Terrell usually lifts two 20-pound weights 12 times. If he uses two 15-pound weights instead, how many times must Terrell lift them in order to lift the same total weight?",
        "solution": "If Terrell lifts two 20-pound weights 12 times, he lifts a total of $2\\cdot 12\\cdot20=480$ pounds of weight.  If he lifts two 15-pound weights instead for $n$ times, he will lift a total of $2\\cdot15\\cdot n=30n$ pounds of weight.  Equating this to 480 pounds, we can solve for $n$:\n\\begin{align*}\n30n&=480\\\\\n\\Rightarrow\\qquad n&=480/30=\\boxed{16}\n\\end{align*}\nFinal Answer: The final answer is $16$. I hope it is correct.",
        "few_shot": "1",
    },
    {
        "problem": "If the system of equations\n\n\\begin{align*}\n6x-4y&=a,\\\\\n6y-9x &=b.\n\\end{align*}has a solution $(x, y)$ where $x$ and $y$ are both nonzero,\nfind $\\frac{a}{b},$ assuming $b$ is nonzero.",
        "solution": "If we multiply the first equation by $-\\frac{3}{2}$, we obtain\n\n$$6y-9x=-\\frac{3}{2}a.$$Since we also know that $6y-9x=b$, we have\n\n$$-\\frac{3}{2}a=b\\Rightarrow\\frac{a}{b}=\\boxed{-\\frac{2}{3}}.$$\nFinal Answer: The final answer is $-\\frac{2}{3}$. I hope it is correct.",
        "few_shot": "1",
    },
]


def fewshot_samples() -> list[dict]:
    return [dict(s) for s in FEWSHOT]


def rows(math500: bool = False, subject: str | None = None, task: str | None = None, data_dir=None) -> list[dict]:
    """MATH500, or the full MATH test set (one subject, by its ``type``, or all)."""
    if math500:
        path = data.require(data.MATH500, task or "offline_minerva_math500", data_dir)
        return [
            {"problem": r["problem"], "solution": r["solution"]} for r in data.read_jsonl(path, ("problem", "solution"))
        ]
    if subject is not None and subject not in data.MATH_SUBJECTS:
        raise ValueError(f"Unknown MATH subject {subject!r}; expected one of {list(data.MATH_SUBJECTS)}.")
    path = data.require(data.MATH_TEST, task or "offline_minerva_math", data_dir)
    return [
        {"problem": r["problem"], "solution": r["solution"], "type": r["type"], "level": r.get("level")}
        for r in data.read_jsonl(path, ("problem", "solution", "type"))
        if subject is None or r["type"] == subject
    ]


def dataset(math500: bool = False, subject: str | None = None, task: str | None = None, data_dir=None, **_metadata):
    """lm-eval ``custom_dataset`` entry."""
    import datasets

    return {"test": datasets.Dataset.from_list(rows(math500, subject, task, data_dir))}


def process_docs(dataset):
    """Adds ``answer``: the normalised content of the solution's last ``\\boxed{}``."""
    return minerva_scoring.process_docs(dataset)


def doc_to_text(doc: dict) -> str:
    return minerva_scoring.doc_to_text(doc)


def process_results(doc: dict, results: list[str]) -> dict[str, int]:
    """``exact_match`` (normalised final answer, sympy equivalence) and ``math_verify``."""
    return minerva_scoring.process_results(doc, results)
