"""``kdlab lm``: language-model distillation commands.

    kdlab lm train-teacher lm/docs              # train (or resume) the recipe's teacher
    kdlab lm distill lm/docs --method fkl       # one student (a study method, or the recipe's distill)
    kdlab lm ablate lm/docs                     # the paired multi-seed study and its table
    kdlab lm ablate lm/arithmetic               # answers vs traces vs teacher traces (exact match)
    kdlab lm generate runs/lm/lm_docs/teacher/best.pt --prompt "The with statement"
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


def register(sub) -> None:
    """Add the ``lm`` command (with its sub-commands) to the kdlab argparse subparsers."""
    p = sub.add_parser("lm", help="language-model distillation (token, sequence, on-policy, traces)",
                       description="Language-model distillation; see docs/lm.md.")
    lsub = p.add_subparsers(dest="lm_command", metavar="LM_COMMAND", help="train-teacher | distill | ablate | generate")
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
