"""Engram layer speed, side by side in one run: ours, the reference approach, transformers' PLE.

    python benchmarks/bench_engram.py            # the issue's CPU setting, prints a table
    python benchmarks/bench_engram.py --json     # the figures as JSON
    python benchmarks/bench_engram.py --device cuda

Setting (defaults): one Engram layer, hidden 512, 4 branches, 2- and 3-grams x 8 heads, 64-dim
rows, the reference demo's table (646,400 base rows per head -> 10.34M rows), B=4, T=512.

* ours: ``engram_hf.EngramMemory`` with sparse row gradients (``set_sparse_table_grads``).
* ours-10k: the same layer with a ~10k-row table: the cost of a layer whose table costs nothing.
* reference: ``engram_hf.testing.ReferenceEngram``: the published algorithm as the reference
  implements it (numpy hashing on the host, a Python loop over branches, dense table gradient).
* ple: ``transformers.models.qwen4_exp`` ``Qwen4ExpTextPLELayer`` at the same sizes.

Timings are interleaved across layers and repeated, each after an untimed call of the same kind;
medians are reported. Forward runs under
``torch.no_grad``; forward+backward backpropagates ``(out * w).sum()`` into every parameter and the
input, and frees the gradients (a dense table gradient is allocated anew each step, as in training).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

from engram_hf import EngramMemory, EngramMoEConfig, HashContract
from engram_hf.memory import TokenCompressor
from engram_hf.memory.cache import engram_inputs
from engram_hf.optim import set_sparse_table_grads
from engram_hf.testing import ReferenceEngram
from machine import device_name


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=646_400, help="base rows per head (the demo's 129280*5)")
    p.add_argument("--small-rows", type=int, default=625, help="base rows per head of the ~10k-row limit layer")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--hc-mult", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--embed", type=int, default=512, help="embed dim per n-gram order (64 per head with 8 heads)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--decode-contexts", type=int, nargs="+", default=[128, 1024, 8192])
    p.add_argument("--decode-steps", type=int, default=200)
    p.add_argument("--skip", nargs="*", default=[], choices=["reference", "ple", "decode", "gather"])
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def engram_config(args, rows):
    return EngramMoEConfig(
        vocab_size=50257,
        hidden_size=args.hidden,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=8,
        hc_mult=args.hc_mult,
        engram_layer_ids=[1],
        engram_vocab_size=[rows, rows],
        engram_max_ngram_size=3,
        engram_n_head_per_ngram=args.heads,
        engram_n_embed_per_ngram=args.embed,
        engram_pad_id=50256,
    )


class Ours:
    def __init__(self, args, rows, device):
        self.config = engram_config(args, rows)
        self.layer = EngramMemory(self.config, HashContract.from_config(self.config).layer(1)).to(device)
        _randomize(self.layer)
        set_sparse_table_grads(self.layer, True)
        self.rows = self.layer.num_table_rows
        # The production path: compression (identity table here), then the cache-aware builder.
        self.compressor = TokenCompressor(self.config.vocab_size, self.config.vocab_size, self.config.engram_pad_id)
        self.compressor.set_table(torch.arange(self.config.vocab_size))
        self.compressor.to(device)

    def inputs(self, ids, cache=None):
        canonical, pad = self.compressor(ids)
        return engram_inputs(canonical, pad, 2, None, cache, 1)

    def forward(self, hidden, ids):
        return self.layer(hidden, self.inputs(ids))


class Reference:
    def __init__(self, args, rows, device):
        self.layer = ReferenceEngram(
            layer_id=1,
            layer_ids=[1],
            engram_vocab_size=[rows, rows],
            max_ngram_size=3,
            n_embed_per_ngram=args.embed,
            n_head_per_ngram=args.heads,
            hidden_size=args.hidden,
            hc_mult=args.hc_mult,
            kernel_size=4,
            seed=0,
            lookup_table=np.arange(50257),
            pad_id=50256,
        ).to(device)
        _randomize(self.layer)
        self.rows = self.layer.multi_head_embedding.embedding.num_embeddings

    def forward(self, hidden, ids):
        return self.layer(hidden, ids)


class PLE:
    def __init__(self, args, rows, device):
        from transformers.models.qwen4_exp.configuration_qwen4_exp import Qwen4ExpTextConfig
        from transformers.models.qwen4_exp.modeling_qwen4_exp import Qwen4ExpTextPLELayer

        self.config = Qwen4ExpTextConfig(
            hidden_size=args.hidden,
            hc_count=args.hc_mult,
            num_hidden_layers=1,
            layer_types=["linear_attention"],
            ple_layer_ids=[1],
            ple_embed_dim=2 * args.embed,
            ngram_size=3,
            heads_per_ngram=args.heads,
            ngram_vocab_size_base=rows,
            vocab_size=50257,
            eos_token_id=50256,
        )
        self.layer = Qwen4ExpTextPLELayer(self.config, 0, 0).to(device)
        _randomize(self.layer)
        self.rows = self.layer.ple_embedding.ngram_embedding.num_embeddings

    def forward(self, hidden, ids, cache=None):
        return self.layer(hidden.flatten(-2), ids, cache)


@torch.no_grad()
def _randomize(module):
    g = torch.Generator(device="cpu").manual_seed(0)
    for name, p in module.named_parameters():
        if p.numel() > 50_000_000:
            p.normal_(0, 0.02)  # tables: in place, no host copy
        elif "norm" in name:
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.05 * torch.randn(p.shape, generator=g))


def bench_layers(args, device, hidden, ids):
    layers = {"ours": Ours(args, args.rows, device), "ours-10k": Ours(args, args.small_rows, device)}
    if "reference" not in args.skip:
        layers["reference"] = Reference(args, args.rows, device)
    if "ple" not in args.skip:
        layers["ple"] = PLE(args, args.rows, device)
    weight = torch.randn_like(hidden)
    tokens = ids.numel()

    def fwd(layer):
        with torch.no_grad():
            layer.forward(hidden, ids)

    def fwd_bwd(layer):
        h = hidden.clone().requires_grad_()
        out = layer.forward(h, ids)
        (out.reshape(weight.shape) * weight).sum().backward()
        layer.layer.zero_grad(set_to_none=True)

    times = {name: {"fwd": [], "fwd_bwd": []} for name in layers}
    for layer in layers.values():  # warm-up
        fwd(layer)
        fwd_bwd(layer)
    for _ in range(args.repeats):
        for name, layer in layers.items():
            # Each timed call follows an untimed one of the same kind, so it does not pay for what the
            # previous layer left behind (e.g. unmapping a table-sized dense gradient).
            fwd(layer)
            times[name]["fwd"].append(timed(lambda layer=layer: fwd(layer), device))
            fwd_bwd(layer)
            times[name]["fwd_bwd"].append(timed(lambda layer=layer: fwd_bwd(layer), device))
    result = {
        name: {
            "table_rows": layer.rows,
            "fwd_tok_s": tokens / statistics.median(t["fwd"]),
            "fwd_bwd_tok_s": tokens / statistics.median(t["fwd_bwd"]),
        }
        for name, (layer, t) in ((n, (layers[n], times[n])) for n in layers)
    }
    return layers, result


def bench_gather(ours: Ours, device, ids, repeats):
    """Row gather of ours vs a plain device copy of the same number of bytes. Every repeat uses
    fresh token ids, so rows come cold from the table as in a real forward."""
    layer = ours.layer
    g = torch.Generator().manual_seed(2)
    batches = [ours.inputs(torch.randint(0, 50256, ids.shape, generator=g).to(device)) for _ in range(repeats * 4)]
    with torch.no_grad():
        out = layer.lookup(batches[0])[0]
        src = torch.empty_like(out).normal_()
        dst = torch.empty_like(out)
        gather, copy = [], []
        for inputs in batches:
            gather.append(timed(lambda inputs=inputs: layer.lookup(inputs), device))
            copy.append(timed(lambda: dst.copy_(src), device))
    nbytes = out.numel() * out.element_size()
    g, c = statistics.median(gather), statistics.median(copy)
    # Bandwidth counts bytes moved: read + write for both.
    return {
        "bytes": nbytes,
        "gather_GBps": 2 * nbytes / g / 1e9,
        "copy_GBps": 2 * nbytes / c / 1e9,
        "fraction_of_copy": c / g,
    }


def bench_gemm_floor(ours: Ours, device, hidden, ids, repeats):
    """Forward time of the key and value projections alone: a floor every Engram implementation
    (PLE included) pays, since both GEMMs are part of the algorithm."""
    layer = ours.layer
    with torch.no_grad():
        e = layer.lookup(ours.inputs(ids))[0]
        times = [timed(lambda: (layer.key_proj(e), layer.value_proj(e)), device) for _ in range(repeats * 2)]
    return statistics.median(times)


def bench_decode(layers, args, device):
    """Per-token cost of one cached decode step after `context` tokens of prefill."""
    from transformers import DynamicCache

    out = {}
    candidates = {"ours": layers["ours"]}
    if "ple" in layers:
        candidates["ple"] = layers["ple"]
    g = torch.Generator().manual_seed(1)
    for name, wrapper in candidates.items():
        out[name] = {}
        for ctx in args.decode_contexts:
            ids = torch.randint(0, 50256, (1, ctx + args.decode_steps), generator=g).to(device)
            hidden = torch.randn(1, ctx + args.decode_steps, args.hc_mult, args.hidden, generator=g).to(device)
            cache = DynamicCache(config=wrapper.config)
            with torch.no_grad():
                step = _decode_step(name, wrapper, cache)
                step(hidden[:, :ctx], ids[:, :ctx])
                times = [
                    timed(lambda t=t, step=step, h=hidden, x=ids: step(h[:, t : t + 1], x[:, t : t + 1]), device)
                    for t in range(ctx, ctx + args.decode_steps)
                ]
            out[name][str(ctx)] = statistics.median(times) * 1e6
    return out


def _decode_step(name, wrapper, cache):
    if name == "ple":
        return lambda h, ids: wrapper.forward(h, ids, cache)

    def step(h, ids):
        return wrapper.layer(h, wrapper.inputs(ids, cache), cache)

    return step


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ids = torch.randint(0, 50256, (args.batch, args.seq)).to(device)
    hidden = torch.randn(args.batch, args.seq, args.hc_mult, args.hidden).to(device)

    layers, results = bench_layers(args, device, hidden, ids)
    report = {
        "machine": {
            "device": device_name(device),
            "torch": torch.__version__,
            "threads": args.threads,
            "python": sys.version.split()[0],
        },
        "setting": {
            k: getattr(args, k) for k in ("rows", "small_rows", "hidden", "hc_mult", "heads", "embed", "batch", "seq")
        },
        "layers": results,
        "ratios": {},
    }
    ours = results["ours"]
    for base in ("ple", "reference"):
        if base in results:
            report["ratios"][f"fwd_vs_{base}"] = ours["fwd_tok_s"] / results[base]["fwd_tok_s"]
            report["ratios"][f"fwd_bwd_vs_{base}"] = ours["fwd_bwd_tok_s"] / results[base]["fwd_bwd_tok_s"]
    report["ratios"]["fwd_bwd_big_vs_10k_table"] = ours["fwd_bwd_tok_s"] / results["ours-10k"]["fwd_bwd_tok_s"]
    floor = bench_gemm_floor(layers["ours"], device, hidden, ids, args.repeats)
    tokens = ids.numel()
    report["gemm_floor"] = {
        "projections_ms": floor * 1e3,
        "non_gemm_ms": {n: (tokens / r["fwd_tok_s"] - floor) * 1e3 for n, r in results.items()},
        "fwd_tok_s_if_only_gemms": tokens / floor,
    }
    if "gather" not in args.skip:
        report["gather"] = bench_gather(layers["ours"], device, ids, args.repeats)
    if "decode" not in args.skip:
        report["decode_us_per_step"] = bench_decode(layers, args, device)

    if args.json:
        print(json.dumps(report, indent=2))
        return report
    print(f"Engram layer, {report['machine']['device']}, {args.threads} threads, B={args.batch} T={args.seq}")
    print(f"{'layer':<10} {'rows':>12} {'fwd tok/s':>12} {'fwd+bwd tok/s':>15}")
    for name, r in results.items():
        print(f"{name:<10} {r['table_rows']:>12,} {r['fwd_tok_s']:>12,.0f} {r['fwd_bwd_tok_s']:>15,.0f}")
    for k, v in report["ratios"].items():
        print(f"{k:<28} {v:6.2f}x")
    f = report["gemm_floor"]
    print(
        f"key+value projections alone: {f['projections_ms']:.1f} ms per forward; the rest: "
        + ", ".join(f"{n} {ms:.1f} ms" for n, ms in f["non_gemm_ms"].items())
    )
    if "gather" in report:
        g = report["gather"]
        print(f"gather {g['gather_GBps']:.1f} GB/s vs copy {g['copy_GBps']:.1f} GB/s", end=" ")
        print(f"-> {g['fraction_of_copy']:.2f} of copy")
    if "decode_us_per_step" in report:
        for name, d in report["decode_us_per_step"].items():
            print(f"decode {name:<5} " + "  ".join(f"ctx {c}: {us:,.0f} us" for c, us in d.items()))
    return report


if __name__ == "__main__":
    main()
