"""LoRA with PEFT: only adapters (and chosen modules) train; adapters save, load and merge."""

import pytest
import torch

peft = pytest.importorskip("peft")

from engram_hf.training import lora_config  # noqa: E402

from conftest import corpus_blocks as _corpus_blocks  # noqa: E402
from conftest import tiny_model  # noqa: E402


def _train_steps(model, steps=3):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    blocks = _corpus_blocks()
    for i in range(steps):
        ids = blocks[i]["input_ids"][None]
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()


@pytest.mark.parametrize("train_tables", [False, True])
def test_only_adapters_and_chosen_modules_change(train_tables):
    base = tiny_model()
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = peft.get_peft_model(
        base, lora_config(r=4, targets=("attention", "experts", "engram"), train_tables=train_tables)
    )
    _train_steps(model)
    for n, p in base.named_parameters():
        if "lora_" in n or "modules_to_save" in n:
            continue
        assert torch.equal(p, before[n.replace("base_layer.", "").replace("original_module.", "")]), n
    changed_tables = [n for n, p in model.named_parameters() if "modules_to_save" in n and "table" in n]
    assert bool(changed_tables) == train_tables


def test_adapter_save_load_and_merge(tmp_path):
    model = peft.get_peft_model(tiny_model(), lora_config(r=4))
    _train_steps(model)
    ids = _corpus_blocks()[5]["input_ids"][None]
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_model(), tmp_path).eval()
    merged = loaded.merge_and_unload().eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-5)


def test_lora_config_rejects_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        lora_config(r=0)
