"""``engram-hf quickstart``: every step's artefact, and numbers that say what each step showed."""

import json

import pytest

from engram_hf.quickstart import PRESETS, _facts_questions, report, run_quickstart
from engram_hf.utils import OutputExistsError


@pytest.mark.slow
def test_smoke_preset_writes_every_artefact(quickstart_dir):
    for name in ("report.md", "loss_curves.png", "gates.png", "edit.png", "summary.json", "fix.safetensors"):
        assert (quickstart_dir / name).stat().st_size > 0, name
    for name in ("eval/results.md", "eval/masked_vs_unmasked.png", "engram/model/README.md", "moe/model/config.json"):
        assert (quickstart_dir / name).stat().st_size > 0, name
    s = json.loads((quickstart_dir / "summary.json").read_text())
    assert set(s["losses"]) == {"MoE baseline", "Engram MoE"}
    moe, engram = s["parameters"]["moe"], s["parameters"]["engram"]
    assert abs(moe["total"] - engram["total"]) <= 0.01 * moe["total"], "iso-parameter"
    assert engram["tables"] > 0 == moe["tables"]
    assert s["reload_max_abs_diff"]["disk"] == 0.0, "the disk tier serves the same rows"
    acc = s["facts_eval"]
    assert 0 <= acc["masked"] <= 1 and 0 <= acc["on"] <= 1
    edit = s["edit"]
    assert edit["success"] and edit["reverted_bit_exact"] and edit["rows"] > 0
    prompt = edit["probes"][0]
    assert prompt["p_new_after"] > prompt["p_new_before"]
    text = (quickstart_dir / "report.md").read_text()
    for heading in ("## 1. Training", "## 2. Save and reload", "## 3. Evaluation", "## 4. Correcting", "## 5. Where"):
        assert heading in text
    assert json.loads((quickstart_dir / ".engram-hf-output.json").read_text())["command"] == "quickstart"


def test_bad_input_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="Unknown quickstart preset"):
        run_quickstart(tmp_path / "q", preset="huge")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        run_quickstart(tmp_path / "mine", preset="smoke")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"
    with pytest.raises(FileNotFoundError):
        run_quickstart(tmp_path / "q", preset="smoke", data=[str(tmp_path / "missing.txt")])


def test_fact_questions_hold_the_true_object_once():
    import random

    from engram_hf.editing.facts import FactWorld

    world = FactWorld(n_subjects=PRESETS["smoke"].n_subjects, n_languages=3, n_currencies=3, seed=0)
    rows = _facts_questions(world, random.Random(0))
    assert len(rows) == len(world.facts)
    for fact, row in zip(world.facts, rows):
        assert row["choices"][row["answer"]] == " " + fact.object
        assert len(set(row["choices"])) == len(row["choices"]) >= 2


def test_report_says_when_the_edit_was_skipped():
    summary = {
        "preset": "smoke",
        "documents": 3,
        "facts": 12,
        "wall_s": 1.0,
        "losses": {"MoE baseline": 5.0, "Engram MoE": 4.9},
        "reload_max_abs_diff": {"resident": 0.0, "disk": 0.0},
        "facts_eval": {"on": 0.5, "masked": 0.4, "retained": 0.8, "chance": 1 / 3},
        "edit": {"skipped": "the model states none of the world's facts greedily"},
        "gates": {"text": "x", "mean_gate_per_layer": {}},
    }
    text = report(summary, __import__("pathlib").Path("runs/q"))
    assert "Skipped: the model states none" in text and "80% of the recall is kept" in text
