"""``engram-hf`` command line."""

from __future__ import annotations

import argparse
import sys

from .presets import PRESETS


def _demo(args) -> int:
    from .demo import run_demo

    run_demo(
        out_dir=args.out,
        preset=args.preset,
        steps=args.steps,
        batch_size=args.batch_size,
        block_size=args.block_size,
        learning_rate=args.lr,
        text_files=args.text,
        tokenizer_path=args.tokenizer,
        vocab_size=args.vocab_size,
        prompt=args.prompt,
        seed=args.seed,
    )
    return 0


def _inspect(args) -> int:
    import json

    from .offload.inspect import describe_checkpoint, format_description

    d = describe_checkpoint(args.path, None if args.engram_offload == "none" else args.engram_offload, args.cache_rows)
    print(json.dumps(d, indent=2) if args.json else format_description(d))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engram-hf", description="Engram conditional memory for HF transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="train a tiny EngramMoE on built-in text, save, reload with AutoModelForCausalLM, generate",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--out", default="runs/demo", help="output directory (model/, loss_curve.png, summary.json)")
    demo.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    demo.add_argument("--steps", type=int, default=120)
    demo.add_argument("--batch-size", type=int, default=8)
    demo.add_argument("--block-size", type=int, default=128)
    demo.add_argument("--lr", type=float, default=3e-3)
    demo.add_argument("--text", nargs="+", help="UTF-8 text files to train on instead of the built-in Sonnets")
    demo.add_argument("--tokenizer", help="tokenizer directory (default: train a byte-level BPE on the text)")
    demo.add_argument("--vocab-size", type=int, default=2048, help="size of the BPE tokenizer trained when --tokenizer is not given")
    demo.add_argument("--prompt", default="Shall I compare thee")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)

    insp = sub.add_parser("inspect", help="print each Engram table's size and the expected memory per device")
    insp.add_argument("path", help="checkpoint directory")
    insp.add_argument("--engram-offload", choices=["none", "cpu", "disk"], default="none", help="tier to plan for")
    insp.add_argument("--cache-rows", type=int, default=0, help="hot-row cache size per table (engram_cache_rows)")
    insp.add_argument("--json", action="store_true")
    insp.set_defaults(func=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "steps", 1) < 1:
        print("engram-hf: --steps must be >= 1", file=sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
