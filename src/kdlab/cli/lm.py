"""``kdlab lm``: language-model distillation commands.

    kdlab lm train-teacher lm/docs              # train (or resume) the recipe's teacher
    kdlab lm distill lm/docs --method fkl       # one student (a study method, or the recipe's distill)
    kdlab lm ablate lm/docs                     # the paired multi-seed study and its table
    kdlab lm ablate lm/arithmetic               # answers vs traces vs teacher traces (exact match)
    kdlab lm generate runs/lm/lm_docs/teacher/best.pt --prompt "The with statement"
    kdlab lm hf-distill hf:small/ data.jsonl --teacher hf:big/ --term ce:0.5 --term fkl:0.5 --lora-r 8
"""

from __future__ import annotations

import json
from kdlab.cli import args as cargs


def _overrides(args) -> list:
    ov = cargs.recipe_overrides(args, with_data_dir=False)
    if getattr(args, "device_given", False):
        ov.append(f"teacher.train.device={args.device}")
    return ov


def cmd_ablate(args) -> int:
    """An alias of ``kdlab ablate`` for LM recipes (the same study, table and statistics)."""
    from kdlab.experiments.study import lm_ablate

    lm_ablate(args.recipe, out_dir=args.out, seeds=args.seeds, overrides=_overrides(args),
              methods=[m for m in args.methods.split(",") if m] if args.methods else None,
              progress=cargs.progress(args))
    return 0


def cmd_train_teacher(args) -> int:
    from kdlab.experiments.commands import lm_train_teacher

    path = lm_train_teacher(args.recipe, _overrides(args), out=args.out, progress=cargs.progress(args))
    print(json.dumps({"teacher": str(path)}))
    return 0


def cmd_distill(args) -> int:
    from kdlab.experiments.commands import lm_distill

    row = lm_distill(args.recipe, _overrides(args), out=args.out, method=args.method, seed=args.seed,
                     progress=cargs.progress(args))
    print(json.dumps(row, default=str))
    return 0


def cmd_generate(args) -> int:
    from kdlab.experiments.commands import lm_generate

    print(lm_generate(args.checkpoint, args.prompt, max_new=args.max_new, temperature=args.temperature,
                      top_k=args.top_k, seed=args.seed, kv_cache=not args.no_kv_cache))
    return 0


def _term(spec: str) -> dict:
    name, _, w = spec.partition(":")
    try:
        return {"term": name, "weight": float(w) if w else 1.0}
    except ValueError:
        raise ValueError(f"--term {spec!r}: give NAME or NAME:WEIGHT, e.g. fkl:0.5") from None


def cmd_hf_distill(args) -> int:
    from kdlab.lm.hf import hf_train

    hidden = {"loss": args.hidden, "weight": args.hidden_weight} if args.hidden else None
    lora = {"r": args.lora_r, "alpha": args.lora_alpha, "target_modules": args.lora_targets} if args.lora_r else None
    res = hf_train(args.student, args.data, args.out, teacher=args.teacher, val_data=args.val_data,
                   terms=[_term(t) for t in (args.term or (["fkl"] if args.teacher else ["ce"]))], lora=lora,
                   hidden=hidden, epochs=args.epochs, steps_per_epoch=args.steps, batch_size=args.batch_size,
                   lr=args.lr, max_len=args.max_len, seed=args.seed, device=args.device)
    print(json.dumps({k: res.get(k) for k in ("hf_dir", "checkpoint", "best_epoch", "val_bpb", "val_kl",
                                               "trainable_params")}, default=str))
    return 0


def register(sub) -> None:
    """Add the ``lm`` command (with its sub-commands) to the kdlab argparse subparsers."""
    p = sub.add_parser("lm", help="language-model distillation (token, sequence, on-policy, traces)",
                       description="Language-model distillation; see docs/lm.md.")
    lsub = p.add_subparsers(dest="lm_command", metavar="LM_COMMAND", help="train-teacher | distill | ablate | generate | hf-distill")
    lsub.required = True

    def common(q):
        q.add_argument("recipe", help="LM recipe: a YAML path or a shipped name (lm/docs, lm/code, lm/arithmetic)")
        cargs.add_out(q, "runs/lm/<recipe name with / as _>, e.g. runs/lm/lm_docs")
        cargs.add_set(q, "the LM recipe", "e.g. --set train.epochs=5 (the student's; the teacher trains by "
                      "teacher.train.*, e.g. --set teacher.train.epochs=2)")
        cargs.add_device(q, recipe=True)
        cargs.add_quiet(q)

    q = lsub.add_parser("train-teacher", help="train (or resume) the recipe's teacher")
    common(q)
    q.set_defaults(func=cmd_train_teacher)

    q = lsub.add_parser("distill", help="train one student")
    common(q)
    q.add_argument("--method", help="a study method of the recipe (default: the recipe's distill section)")
    q.add_argument("--seed", type=cargs.SEED, default=0)
    q.set_defaults(func=cmd_distill)

    q = lsub.add_parser("ablate", help="paired multi-seed study: CE vs divergences vs seq-level vs on-policy "
                                       "(the same study as `kdlab ablate`)")
    common(q)
    cargs.add_seeds(q)
    q.add_argument("--methods", help="comma-separated subset of the recipe's study.methods")
    q.set_defaults(func=cmd_ablate)

    q = lsub.add_parser("generate", help="continue a prompt with a trained LM")
    q.add_argument("checkpoint", help="an LM run's best.pt (OUT/teacher/best.pt or OUT/<method>/seed<k>/best.pt)")
    q.add_argument("--prompt", required=True, help="the text to continue")
    q.add_argument("--max-new", type=cargs.POSITIVE, default=64, help="tokens to generate (default %(default)s)")
    q.add_argument("--temperature", type=cargs.number(0), default=0.0, help="0 = greedy (default); > 0 samples")
    q.add_argument("--top-k", type=cargs.POSITIVE, default=None, help="sample among the k most likely tokens (default: all)")
    q.add_argument("--seed", type=cargs.SEED, default=0, help="sampling seed (default %(default)s)")
    q.add_argument("--no-kv-cache", action="store_true", help="recompute the whole prefix every step")
    q.set_defaults(func=cmd_generate)

    q = lsub.add_parser("hf-distill", help="distil (or fine-tune) a Hugging Face causal LM from a local folder "
                                           "on a local jsonl / text / parquet file")
    q.add_argument("student", help="hf:<folder> written by save_pretrained (its tokenizer is used)")
    q.add_argument("data", help="local .jsonl/.json (messages, prompt+completion or text), .txt or .parquet")
    q.add_argument("--teacher", help="hf:<folder> with the same tokenizer (leave out: CE fine-tuning)")
    q.add_argument("--out", required=True, type=cargs.folder, help="run folder: best.pt, student.pt, hf/ (save_pretrained), adapter/")
    q.add_argument("--val-data", help="a held-out file that selects the best epoch (default: the data)")
    q.add_argument("--term", action="append", help="NAME[:WEIGHT], repeatable: ce or a divergence "
                                                   "(`kdlab losses`); default fkl (ce without a teacher)")
    q.add_argument("--hidden", choices=["cos", "mse"], help="add hidden-state distillation (uniform layer map)")
    q.add_argument("--hidden-weight", type=float, default=1.0)
    q.add_argument("--lora-r", type=int, default=0, help="train a LoRA adapter of this rank (base frozen)")
    q.add_argument("--lora-alpha", type=int, default=16)
    q.add_argument("--lora-targets", nargs="+", help="module names for LoRA (default: peft's for the architecture)")
    q.add_argument("--epochs", type=int, default=1)
    q.add_argument("--steps", type=int, default=None, help="steps per epoch (default: one pass over the data)")
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--lr", type=float, default=1e-4)
    q.add_argument("--max-len", type=int, default=512)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--device", default="cpu")
    q.set_defaults(func=cmd_hf_distill)
