"""Bad configs and bad inputs fail early with specific messages."""

import pytest
import torch

from engram_hf import build_compression_table
from engram_hf.memory.convert import load_reference_engram

from conftest import tiny_config, tiny_model

BAD_CONFIGS = [
    (dict(engram_layer_ids=[0, 3]), "outside \\[0, num_hidden_layers=3\\)"),
    (dict(engram_layer_ids=[-1]), "outside"),
    (dict(engram_layer_ids=[1, 1]), "duplicates"),
    (dict(hidden_size=0), "hidden_size must be a positive integer"),
    (dict(hidden_size=30), "not divisible by num_attention_heads"),
    (dict(num_key_value_heads=3), "multiple of num_key_value_heads"),
    (dict(engram_n_embed_per_ngram=18, engram_n_head_per_ngram=4), "not divisible by engram_n_head_per_ngram"),
    (dict(engram_max_ngram_size=1, engram_vocab_size=[]), "engram_max_ngram_size must be an integer >= 2"),
    (dict(engram_vocab_size=[53]), "one size per n-gram order"),
    (dict(engram_vocab_size=[53, 0]), "entries must be > 1"),
    (dict(num_experts_per_tok=5), "exceeds n_routed_experts"),
    (dict(first_k_dense_replace=4), "first_k_dense_replace"),
    (dict(hc_mult=0), "hc_mult must be a positive integer"),
    (dict(engram_kernel_size=-2), "engram_kernel_size must be >= 2"),
    (dict(engram_pad_id=97), "outside the vocabulary"),
    (dict(scoring_func="relu"), "scoring_func"),
    (dict(compressed_vocab_size=0), "compressed_vocab_size must be a positive integer"),
    (dict(engram_layer_ids="12"), "engram_layer_ids must be a list of integers, got str"),
    (dict(engram_layer_ids=[1.5]), "engram_layer_ids must be a list of integers"),
    (dict(engram_layer_ids=1), "engram_layer_ids must be a list of integers, got int"),
    (dict(engram_vocab_size=[53.5, 59]), "engram_vocab_size must be a list of integers"),
    (dict(rms_norm_eps=-1), "rms_norm_eps must be a positive number"),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps must be a positive number"),
    (dict(initializer_range=-0.1), "initializer_range must be a number >= 0"),
    (dict(attention_dropout=1.0), "attention_dropout must be in \\[0, 1\\)"),
    (dict(hidden_act="swishy"), "hidden_act 'swishy' is not a transformers activation"),
    (dict(engram_kernel_size=1), "engram_kernel_size must be >= 2"),
    (dict(engram_seed=-1), "engram_seed must be an integer >= 0"),
    (dict(attention_bias="yes"), "attention_bias must be True or False"),
    (dict(eos_token_id=500), "eos_token_id \\(500\\) must be None or token ids"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": -5}), "rope_theta must be a positive number"),
    (dict(engram_offload="gpu"), "engram_offload must be"),
]


@pytest.mark.parametrize("overrides,message", BAD_CONFIGS, ids=[str(o) for o, _ in BAD_CONFIGS])
def test_bad_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_config_roundtrip_recomputes_derived_fields():
    cfg = tiny_config()
    assert cfg.layer_types == ["hybrid", "full_attention", "hybrid"]
    d = cfg.to_dict()
    d["layer_types"] = ["stale"] * 3  # as older checkpoints wrote it: ignored, derived afresh
    again = type(cfg).from_dict(d)
    assert again.layer_types == cfg.layer_types and again.engram_vocab_size == cfg.engram_vocab_size


def test_derived_fields_follow_later_changes_and_generation_works():
    from engram_hf import EngramMoEForCausalLM

    cfg = tiny_config()
    cfg.engram_layer_ids = [1, 2]
    assert cfg.layer_types == ["full_attention", "hybrid", "hybrid"]
    model = EngramMoEForCausalLM(cfg).eval()
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 6)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("engram_layer_ids", [0, 7], "outside"),
        ("engram_layer_ids", "12", "must be a list of integers"),
        ("rms_norm_eps", -1.0, "rms_norm_eps must be a positive number"),
        ("hc_mult", 0, "hc_mult must be a positive integer"),
    ],
)
def test_bad_value_set_after_construction_fails_when_the_model_is_built(field, value, message):
    from engram_hf import EngramMoEForCausalLM

    cfg = tiny_config()
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=message):
        EngramMoEForCausalLM(cfg)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.mark.parametrize(
    "ids,exc,message",
    [
        (torch.tensor([[1, -3, 4]]), ValueError, "contains -3, outside the vocabulary"),
        (torch.tensor([[1, 97, 4]]), ValueError, "contains 97, outside the vocabulary"),
        (torch.tensor([[1.0, 2.0]]), TypeError, "integer tensor"),
        (torch.tensor([1, 2, 3]), ValueError, "\\[batch, seq_len\\]"),
        (torch.zeros(1, 0, dtype=torch.long), ValueError, "The input is empty \\(shape \\[1, 0\\]\\)"),
        (torch.zeros(0, 5, dtype=torch.long), ValueError, "The input is empty \\(shape \\[0, 5\\]\\)"),
    ],
)
def test_bad_input_ids(model, ids, exc, message):
    with pytest.raises(exc, match=message):
        model(ids)


def test_inputs_embeds_alone_is_refused(model):
    with pytest.raises(ValueError, match="needs input_ids"):
        model(inputs_embeds=torch.randn(1, 3, 32))


def test_bad_attention_mask(model):
    with pytest.raises(ValueError, match="does not cover"):
        model(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 2, dtype=torch.long))


def test_bad_compression_table(model):
    with pytest.raises(ValueError, match="shape \\[97\\]"):
        model.set_compression_table(torch.arange(10))
    with pytest.raises(ValueError, match="canonical ids"):
        model.set_compression_table(torch.zeros(97, dtype=torch.long))
    with pytest.raises(TypeError, match="integers"):
        model.set_compression_table(torch.zeros(97))


def test_converter_rejects_wrong_hc_mult(model):
    engram = model.model.layers[0].engram
    ref = {"multi_head_embedding.embedding.weight": engram.table.weight.detach().clone()}
    with pytest.raises(KeyError, match="lacks"):
        load_reference_engram(engram, ref)


def test_empty_tokenizer_is_refused():
    class Empty:
        def __len__(self):
            return 0

    with pytest.raises(ValueError, match="empty"):
        build_compression_table(Empty())


def test_generate_on_empty_input_is_refused(model):
    with pytest.raises(ValueError, match="empty"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2, pad_token_id=0)
