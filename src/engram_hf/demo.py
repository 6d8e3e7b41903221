"""The built-in end-to-end job: tokenizer → compression table → tiny EngramMoE → Trainer →
save → reload through AutoModelForCausalLM → checks → generation → loss-curve PNG.

The whole run is built in a temp directory beside ``out_dir`` and moved into place only when every
check has passed, so a failed demo leaves no ``out_dir`` that could pass for a result (and an
earlier successful one stays as it was). An existing ``out_dir`` the demo did not write is refused
unless ``overwrite``; files of the user's in it are kept.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from .data import builtin_text
from .training import TrainSpec, read_texts, run_training
from .utils import claim_output_dir


@torch.no_grad()
def greedy_by_recompute(model, input_ids: torch.LongTensor, new_tokens: int) -> torch.LongTensor:
    """Greedy decoding with no cache and no ``generate``: every step runs the full forward over the
    whole sequence. The reference that cached generation is checked against."""
    ids = input_ids
    for _ in range(new_tokens):
        nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids


def run_demo(
    out_dir: str | Path = "runs/demo",
    preset: str = "tiny",
    steps: int = 120,
    batch_size: int = 8,
    block_size: int = 128,
    learning_rate: float = 3e-3,
    text_files: list[str] | None = None,
    tokenizer_path: str | None = None,
    vocab_size: int = 2048,
    prompt: str = "Shall I compare thee",
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    output = claim_output_dir(out_dir, "demo", overwrite=overwrite)
    texts = read_texts(text_files) if text_files else [builtin_text()]
    final = output.path
    summary: dict = {}

    def build(tmp: Path) -> None:
        spec = TrainSpec(
            out_dir=str(tmp),
            config=preset,
            tokenizer=tokenizer_path,
            bpe_vocab_size=vocab_size,
            steps=steps,
            batch_size=batch_size,
            block_size=block_size,
            learning_rate=learning_rate,
            seed=seed,
            display_dir=str(final),
        )
        result = run_training(spec, texts)
        model, tokenizer = result["model"], result["tokenizer"]
        print(
            f"EngramMoE ({preset}): {result['parameters'] / 1e6:.2f}M parameters, of which Engram tables "
            f"{result['engram_table_parameters'] / 1e6:.2f}M; vocabulary {result['vocab_size']}."
        )
        print(f"Held-out loss: {result['eval_loss_before']:.3f} -> {result['eval_loss_after']:.3f} nats/token.")

        reloaded = AutoModelForCausalLM.from_pretrained(tmp / "model").eval()
        model.eval()
        probe = tokenizer(texts[0][:2000], return_tensors="pt")["input_ids"][:, :block_size]
        with torch.no_grad():
            # Same weights in different allocations may take different BLAS paths: equal to fp32 rounding.
            max_diff = (model(probe).logits - reloaded(probe).logits).abs().max().item()
        if max_diff > 1e-5:
            raise RuntimeError(f"The reloaded model's logits differ from the trained model's by {max_diff:.2e}.")
        prompt_ids = tokenizer(prompt, return_tensors="pt")
        new_tokens = 40
        with torch.no_grad():
            cached = reloaded.generate(
                **prompt_ids,
                use_cache=True,
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=None,
            )
        reference = greedy_by_recompute(reloaded, prompt_ids["input_ids"], new_tokens)
        if not torch.equal(cached, reference):
            first = int((cached != reference).nonzero()[0, 1])
            raise RuntimeError(
                f"Cached generation differs from greedy decoding by full recomputation at token {first}: "
                "the cache is not being used correctly."
            )
        text = tokenizer.decode(cached[0], skip_special_tokens=True)
        print(
            f"Reloaded with AutoModelForCausalLM: logits equal (max diff {max_diff:.1e}); cached generation "
            "equals greedy decoding by full recomputation."
        )
        print(f"Greedy sample:\n  {text!r}")
        summary.update({k: v for k, v in result.items() if k not in ("trainer", "model", "tokenizer", "log_history")})
        summary.update(
            preset=preset, steps=steps, reload_logits_max_diff=max_diff, cached_generation_matches=True, sample=text
        )
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2))

    output.write(build)
    print(f"Wrote {final}: model/, loss_curve.png, summary.json")
    return summary
