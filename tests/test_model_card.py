"""Model cards: rendered from the checkpoint by save_pretrained, train and `engram-hf card`; a
README of the user's is never replaced; the evaluation section survives re-rendering."""

import json
import re

import yaml
from transformers import AutoModelForCausalLM

from engram_hf import attach_engram, save_engram
from engram_hf.cli import main as cli_main
from engram_hf.evaluation.report import update_card
from engram_hf.model_card import CARD_DATA, MARKER

from conftest import tiny_causal_lm, tiny_compression, tiny_model, tiny_spec


def _header(card: str) -> dict:
    return yaml.safe_load(card.split("---")[1])


def test_save_pretrained_writes_a_card_that_describes_the_model(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "ckpt")
    card = (tmp_path / "ckpt" / "README.md").read_text()
    header = _header(card)
    assert header["library_name"] == "transformers" and header["pipeline_tag"] == "text-generation"
    assert "engram" in header["tags"] and header["license"]
    counts = model.parameter_counts()
    assert f"{counts['tables'] / 1e3:.2f}K in Engram tables" in card
    assert f"activated per token | {counts['activated'] / 1e3:.2f}K" in card
    assert model.engram_fingerprint() in card
    for lh in model.hash_contract.layers:  # the multipliers and primes, as the contract has them
        assert str(list(lh.multipliers)) in card and f"{lh.primes[0]}..{lh.primes[-1]}" in card
    assert 'engram_offload="disk"' in card and str(tmp_path / "ckpt") in card


def test_a_readme_of_the_users_is_kept_and_the_eval_section_survives(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "README.md").write_text("# my own notes\n")
    tiny_model().save_pretrained(target)
    assert (target / "README.md").read_text() == "# my own notes\n"
    # A generated card is rendered again by every save, keeping the evaluation section.
    other = tmp_path / "ckpt2"
    tiny_model().save_pretrained(other)
    update_card(other, "## Evaluation\n\nacc 0.42")
    tiny_model(seed=1).save_pretrained(other)
    card = (other / "README.md").read_text()
    assert MARKER in card and card.count("acc 0.42") == 1
    assert cli_main(["card", str(target)]) == 1  # the user's README: refused without --overwrite
    assert (target / "README.md").read_text() == "# my own notes\n"
    assert cli_main(["card", str(target), "--overwrite"]) == 0
    assert MARKER in (target / "README.md").read_text()


def test_adapter_and_merged_cards_name_their_base(tmp_path):
    tiny_causal_lm("qwen3").save_pretrained(tmp_path / "base")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    attach_engram(model, tiny_spec(), compression_table=tiny_compression())
    save_engram(model, tmp_path / "adapter")
    model.save_pretrained(tmp_path / "merged")
    for d, merged in ((tmp_path / "adapter", False), (tmp_path / "merged", True)):
        card = (d / "README.md").read_text()
        assert _header(card)["base_model"] == str((tmp_path / "base").resolve())
        assert "Qwen3ForCausalLM" in card and model.engram.fingerprint() in card
        assert ("saved with it in this checkpoint" in card) == merged
        assert cli_main(["card", str(d), "--print"]) == 0


def test_train_records_its_recipe_in_the_card(tmp_path, capsys):
    from engram_hf.data import builtin_text
    from engram_hf.training import TrainSpec, run_training

    spec = TrainSpec(out_dir=str(tmp_path / "run"), steps=2, batch_size=2, block_size=32, progress=False)
    run_training(spec, [builtin_text()[:20000]])
    model_dir = tmp_path / "run" / "model"
    info = json.loads((model_dir / CARD_DATA).read_text())
    assert "2 steps" in info["training"]["summary"]
    card = (model_dir / "README.md").read_text()
    assert "held out loss" in card and re.search(r"\d\.\d{3} -> \d\.\d{3} nats/token", card)
    # Rendered again from the checkpoint alone, the card still knows the recipe.
    (model_dir / "README.md").unlink()
    assert cli_main(["card", str(model_dir)]) == 0
    assert "2 steps" in (model_dir / "README.md").read_text()
