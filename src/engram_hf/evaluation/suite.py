"""The offline task suite: every task and group, what data each needs, and the lm-eval YAMLs.

The YAMLs under ``tasks/`` (shipped with the package; ``eval_tasks/`` at the repository root points
there) are generated from this module and committed. Regenerate them after changing anything here::

    python -m engram_hf.evaluation.suite --bbh-prompts DATA/bbh/cot-prompts

where ``DATA/bbh/cot-prompts`` holds the official BBH chain-of-thought prompts (the BBH repository's
``cot-prompts/``), the source of the few-shot exemplars written into the BBH tasks.
``tests/test_eval_tasks.py`` checks the committed files equal a fresh generation.

Task names are lm-eval's with the prefix ``offline_`` (``offline_mmlu``, ``offline_bbh``, ...), so
they never shadow lm-eval's own hub-backed tasks; ``engram-hf eval`` accepts them without it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from . import data, ruler

PREFIX = "offline_"
TASKS_DIR = Path(__file__).resolve().parent / "tasks"
MMLU_CATEGORIES = ("stem", "other", "social_sciences", "humanities")


@dataclass
class Entry:
    """A task or group of the suite: its leaf tasks, their data, and how many few-shot exemplars exist."""

    name: str
    members: tuple[str, ...] = ()  # leaf tasks (a group), or () for a task
    data: tuple[str, ...] = ()  # data-directory files the leaf tasks need
    max_fewshot: int = 0
    unsafe: bool = False


class FunctionRef(str):
    """A YAML ``!function module.name`` reference (resolved by lm-eval relative to the YAML file)."""


def _fn(name: str) -> FunctionRef:
    return FunctionRef(f"utils.{name}")


# ----------------------------------------------------------------------------- definitions
def _mmlu(shots: int) -> tuple[dict, dict[str, dict], dict[str, Entry]]:
    tag = "" if shots == 0 else f"{shots}shot_"
    template = {
        "dataset_path": "",
        "custom_dataset": _fn("mmlu_dataset"),
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
        "D. {{choices[3]}}\nAnswer:",
        "doc_to_choice": ["A", "B", "C", "D"],
        "doc_to_target": "answer",
        "num_fewshot": shots,
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    if shots:
        template |= {"fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"}}
    files, entries = {}, {}
    leaves: dict[str, list[str]] = {c: [] for c in MMLU_CATEGORIES}
    for subject, category in data.MMLU_SUBJECTS.items():
        name = f"{PREFIX}mmlu_{tag}{subject}"
        leaves[category].append(name)
        files[f"mmlu/{tag}{subject}.yaml"] = {
            "include": f"_mmlu_{tag}template_yaml",
            "task": name,
            "task_alias": subject,
            "dataset_kwargs": {"subject": subject, "shots": shots, "task": name},
            "description": f"The following are multiple choice questions (with answers) about "
            f"{subject.replace('_', ' ')}.\n\n",
        }
        entries[name] = Entry(name, data=(data.MMLU_TEST,), max_fewshot=shots)
    top = f"{PREFIX}mmlu" + (f"_{shots}shot" if shots else "")
    for category, names in leaves.items():
        group = f"{top}_{category}"
        files[f"mmlu/_{tag}{category}.yaml"] = {
            "group": group,
            "group_alias": category,
            "task": names,
            "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
            "metadata": {"version": 1.0},
        }
        entries[group] = Entry(group, members=tuple(names))
    files[f"mmlu/_{tag}mmlu.yaml"] = {
        "group": top,
        "task": [f"{top}_{c}" for c in MMLU_CATEGORIES],
        "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
        "metadata": {"version": 1.0},
    }
    entries[top] = Entry(top, members=tuple(n for c in MMLU_CATEGORIES for n in leaves[c]))
    return {f"mmlu/_mmlu_{tag}template_yaml": template}, files, entries


def _bbh(prompts: dict[str, tuple[str, list[dict]]] | None, cot: bool):
    kind = "cot_fewshot" if cot else "fewshot"
    template = {
        "dataset_path": "",
        "custom_dataset": _fn("bbh_dataset"),
        "output_type": "generate_until",
        "test_split": "test",
        "doc_to_text": "Q: {{input}}\nA: Let's think step by step.\n" if cot else "Q: {{input}}\nA:",
        "doc_to_target": "{{target}}",
        "target_delimiter": "" if cot else " ",
        "fewshot_delimiter": "\n\n",
        "num_fewshot": 3,
        "generation_kwargs": {
            "until": ["</s>", "Q:", "\n\n"],
            "do_sample": False,
            "temperature": 0.0,
            "max_gen_toks": 1024 if cot else 256,
        },
        "filter_list": [
            {
                "name": "get-answer",
                "filter": [
                    {"function": "custom", "filter_fn": _fn("bbh_cot_filter" if cot else "bbh_direct_filter")},
                    {"function": "take_first"},
                ],
            }
        ],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    files, entries, names = {}, {}, []
    for bbh_task in data.BBH_TASKS:
        name = f"{PREFIX}bbh_{kind}_{bbh_task}"
        names.append(name)
        entries[name] = Entry(name, data=(data.bbh_file(bbh_task),), max_fewshot=3)
        if prompts is None:
            continue
        description, exemplars = prompts[bbh_task]
        samples = [{"input": e["input"], "target": e["target"] if cot else e["answer"]} for e in exemplars]
        files[f"bbh/{kind}/{bbh_task}.yaml"] = {
            "include": f"_{kind}_template_yaml",
            "task": name,
            "task_alias": bbh_task,
            "dataset_kwargs": {"bbh_task": bbh_task, "task": name},
            "description": description + "\n\n",
            "fewshot_config": {"sampler": "first_n", "samples": samples},
        }
    group = f"{PREFIX}bbh_{kind}"
    aggregate = [{"metric": "exact_match", "aggregation": "mean", "weight_by_size": True, "filter_list": "get-answer"}]
    files[f"bbh/{kind}/_{kind}.yaml"] = {
        "group": group,
        "task": names,
        "aggregate_metric_list": aggregate,
        "metadata": {"version": 1.0},
    }
    entries[group] = Entry(group, members=tuple(names))
    if cot:  # lm-eval's `bbh` is the chain-of-thought few-shot suite
        files["bbh/_bbh.yaml"] = dict(files[f"bbh/{kind}/_{kind}.yaml"], group=f"{PREFIX}bbh")
        entries[f"{PREFIX}bbh"] = Entry(f"{PREFIX}bbh", members=tuple(names))
    return {f"bbh/{kind}/_{kind}_template_yaml": template}, files, entries


def _humaneval():
    name = f"{PREFIX}humaneval"
    config = {
        "task": name,
        "dataset_path": "",
        "custom_dataset": _fn("humaneval_dataset"),
        "unsafe_code": True,
        "output_type": "generate_until",
        "test_split": "test",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{canonical_solution}}",
        "process_results": _fn("humaneval_results"),
        "metric_list": [{"metric": "pass@1", "aggregation": "mean", "higher_is_better": True}],
        "generation_kwargs": {
            "until": ["\nclass", "\ndef", "\n#", "\nif", "\nprint"],
            "max_gen_toks": 1024,
            "do_sample": False,
        },
        "repeats": 1,
        "num_fewshot": 0,
        "metadata": {"version": 1.0},
    }
    return {}, {"humaneval/humaneval.yaml": config}, {name: Entry(name, unsafe=True)}


def _minerva():
    template = {
        "dataset_path": "",
        "custom_dataset": _fn("math_dataset"),
        "process_docs": _fn("math_process_docs"),
        "output_type": "generate_until",
        "test_split": "test",
        "doc_to_text": _fn("math_doc_to_text"),
        "doc_to_target": "{{answer if few_shot is undefined else solution}}",
        "process_results": _fn("math_process_results"),
        "generation_kwargs": {"until": ["Problem:"], "do_sample": False, "temperature": 0},
        "metric_list": [
            {"metric": "exact_match", "aggregation": "mean", "higher_is_better": True},
            {"metric": "math_verify", "aggregation": "mean", "higher_is_better": True},
        ],
        "num_fewshot": 4,
        "fewshot_config": {"sampler": "first_n", "samples": _fn("math_fewshot_samples")},
        "metadata": {"version": 1.0},
    }
    files, entries, names = {}, {}, []
    for subject, suffix in data.MATH_SUBJECTS.items():
        name = f"{PREFIX}minerva_math_{suffix}"
        names.append(name)
        files[f"minerva_math/{suffix}.yaml"] = {
            "include": "_minerva_template_yaml",
            "task": name,
            "task_alias": suffix,
            "dataset_kwargs": {"subject": subject, "task": name},
        }
        entries[name] = Entry(name, data=(data.MATH_TEST,), max_fewshot=4)
    name500 = f"{PREFIX}minerva_math500"
    files["minerva_math/math500.yaml"] = {
        "include": "_minerva_template_yaml",
        "task": name500,
        "dataset_kwargs": {"math500": True, "task": name500},
    }
    entries[name500] = Entry(name500, data=(data.MATH500,), max_fewshot=4)
    group = f"{PREFIX}minerva_math"
    files["minerva_math/_minerva_math.yaml"] = {
        "group": group,
        "task": names,
        "aggregate_metric_list": [
            {"metric": "exact_match", "aggregation": "mean", "weight_by_size": True},
            {"metric": "math_verify", "aggregation": "mean", "weight_by_size": True},
        ],
        "metadata": {"version": 1.0},
    }
    entries[group] = Entry(group, members=tuple(names))
    return {"minerva_math/_minerva_template_yaml": template}, files, entries


def _facts():
    name = f"{PREFIX}facts"
    config = {
        "task": name,
        "dataset_path": "",
        "custom_dataset": _fn("facts_dataset"),
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": "{{prompt}}",
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "target_delimiter": "",
        "num_fewshot": 0,
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    return {}, {"facts/facts.yaml": config}, {name: Entry(name, data=(data.FACTS,))}


def ruler_task_name(task: str) -> str:
    return f"{PREFIX}{task}" if task.startswith("niah") else f"{PREFIX}ruler_{task}"


def _ruler():
    metrics = ["score", *map(str, ruler.LENGTHS)]
    template = {
        "dataset_path": "",
        "custom_dataset": _fn("ruler_dataset"),
        "output_type": "generate_until",
        "test_split": "test",
        "doc_to_text": "{{input}}",
        "doc_to_target": "{{outputs}}",
        "gen_prefix": "{{gen_prefix}}",
        "target_delimiter": " ",
        "process_results": _fn("ruler_results"),
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in metrics],
        "generation_kwargs": {"do_sample": False, "temperature": 0.0, "max_gen_toks": 128, "until": []},
        "num_fewshot": 0,
        "metadata": {"version": 1.0},
    }
    files, entries, names = {}, {}, []
    for task in ruler.TASKS:
        name = ruler_task_name(task)
        names.append(name)
        config = {
            "include": "_ruler_template_yaml",
            "task": name,
            "task_alias": task,
            "dataset_kwargs": {"ruler_task": task, "task": name},
        }
        if ruler.MAX_GEN_TOKS[task] != 128:
            config["generation_kwargs"] = dict(template["generation_kwargs"], max_gen_toks=ruler.MAX_GEN_TOKS[task])
        if task in ruler.PART_MATCH:
            config["process_results"] = _fn("ruler_results_part")
        if task == "cwe":
            config["target_delimiter"] = "\n\n"
        files[f"ruler/{task}.yaml"] = config
        needs = {"qa_squad": (data.SQUAD,), "qa_hotpot": (data.HOTPOTQA,)}.get(task, ())
        entries[name] = Entry(name, data=needs)
    group = f"{PREFIX}ruler"
    files["ruler/_ruler.yaml"] = {
        "group": group,
        "task": names,
        "aggregate_metric_list": [{"metric": "score", "weight_by_size": False}],
        "metadata": {"version": 1.0},
    }
    entries[group] = Entry(group, members=tuple(names))
    return {"ruler/_ruler_template_yaml": template}, files, entries


UTILS = {
    "facts": "from engram_hf.evaluation.facts import dataset as facts_dataset\n",
    "mmlu": "from engram_hf.evaluation.mmlu import dataset as mmlu_dataset\n",
    "bbh/cot_fewshot": "from engram_hf.evaluation.bbh import cot_filter as bbh_cot_filter\n"
    "from engram_hf.evaluation.bbh import dataset as bbh_dataset\n",
    "bbh/fewshot": "from engram_hf.evaluation.bbh import dataset as bbh_dataset\n"
    "from engram_hf.evaluation.bbh import direct_filter as bbh_direct_filter\n",
    "humaneval": "from engram_hf.evaluation.humaneval import dataset as humaneval_dataset\n"
    "from engram_hf.evaluation.humaneval import process_results as humaneval_results\n",
    "minerva_math": "from engram_hf.evaluation.minerva import dataset as math_dataset\n"
    "from engram_hf.evaluation.minerva import doc_to_text as math_doc_to_text\n"
    "from engram_hf.evaluation.minerva import fewshot_samples as math_fewshot_samples\n"
    "from engram_hf.evaluation.minerva import process_docs as math_process_docs\n"
    "from engram_hf.evaluation.minerva import process_results as math_process_results\n",
    "ruler": "from engram_hf.evaluation.ruler import dataset as ruler_dataset\n"
    "from engram_hf.evaluation.ruler import process_results as ruler_results\n"
    "from engram_hf.evaluation.ruler import process_results_part as ruler_results_part\n",
}
UTILS_HEADER = '"""lm-eval `!function` targets of these tasks: generated by engram_hf.evaluation.suite."""\n\n'
README = """# engram-hf offline lm-eval tasks

Generated by `python -m engram_hf.evaluation.suite` (do not edit by hand). Every task reads its data
from the evaluation data directory (task metadata `data_dir`, else `$ENGRAM_HF_EVAL_DATA`, else
`~/.cache/engram-hf/eval`) and never from a hub. See the engram-hf README, section "Evaluation".

    lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True \\
        --include_path eval_tasks --tasks offline_mmlu
"""


def definitions(bbh_prompts: dict | None = None):
    """``(templates, task files, entries)`` of the whole suite; BBH files need the official prompts."""
    templates, files, entries = {}, {}, {}
    parts = [_mmlu(0), _mmlu(5), _bbh(bbh_prompts, cot=True), _bbh(bbh_prompts, cot=False)]
    parts += [_humaneval(), _minerva(), _ruler(), _facts()]
    for t, f, e in parts:
        templates |= t
        files |= f
        entries |= e
    return templates, files, entries


def catalog() -> dict[str, Entry]:
    """Every task and group of the suite by name."""
    return definitions()[2]


def leaves(entry: Entry, entries: dict[str, Entry]) -> list[Entry]:
    return [entries[m] for m in entry.members] if entry.members else [entry]


# ----------------------------------------------------------------------------- YAML
def _dumper():
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def function(dumper, value):
        return dumper.represent_scalar("!function", str(value), style="")

    def text(dumper, value):
        # Multi-line prompts as literal blocks where YAML can hold them exactly, else escaped in quotes.
        style = None
        if "\n" in value:
            lines = value.split("\n")
            literal = not value.endswith("\n\n") and not value.startswith((" ", "\n"))
            literal = literal and all(line == line.rstrip() for line in lines)
            style = "|" if literal else '"'
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(FunctionRef, function)
    Dumper.add_representer(str, text)
    return Dumper


def render(config: dict) -> str:
    import yaml

    return yaml.dump(config, Dumper=_dumper(), sort_keys=False, allow_unicode=True, width=120)


def read_bbh_prompts(directory: str | Path) -> dict[str, tuple[str, list[dict]]]:
    from .bbh import parse_cot_prompt

    directory = Path(directory)
    prompts = {}
    for task in data.BBH_TASKS:
        path = directory / f"{task}.txt"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: the BBH chain-of-thought prompts are needed to write the tasks."
            )
        prompts[task] = parse_cot_prompt(path.read_text(encoding="utf-8"))
    return prompts


def task_files(bbh_prompts: dict) -> dict[str, str]:
    """Every file of the task directory, by relative path, as text."""
    templates, files, _ = definitions(bbh_prompts)
    out = {"README.md": README}
    out |= {path: render(config) for path, config in {**templates, **files}.items()}
    for folder, imports in UTILS.items():  # lm-eval resolves `!function utils.x` beside each YAML
        out[f"{folder}/utils.py"] = UTILS_HEADER + imports
    return out


def write_tasks(out_dir: str | Path, bbh_prompts: dict) -> Path:
    """Write the task directory atomically (replacing it whole)."""
    from ..utils import atomic_write_dir

    def write(tmp: Path):
        for rel, text in task_files(bbh_prompts).items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")

    return atomic_write_dir(out_dir, write)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Write the offline lm-eval task YAMLs of engram-hf.")
    p.add_argument("--bbh-prompts", required=True, help="directory of the official BBH cot-prompts/*.txt")
    p.add_argument("--out", default=str(TASKS_DIR))
    args = p.parse_args(argv)
    print(write_tasks(args.out, read_bbh_prompts(args.bbh_prompts)))


if __name__ == "__main__":
    main()
