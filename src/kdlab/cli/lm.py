"""``kdlab lm``: language-model distillation commands.

    kdlab lm train-teacher lm/docs              # train (or resume) the recipe's teacher
    kdlab lm distill lm/docs --method fkl       # one student (a study method, or the recipe's distill)
    kdlab lm ablate lm/docs                     # the paired multi-seed study and its table
    kdlab lm ablate lm/arithmetic               # answers vs traces vs teacher traces (exact match)
    kdlab lm generate runs/lm/lm_docs/teacher/best.pt --prompt "The with statement"
"""

from __future__ import annotations

import json
from pathlib import Path

from kdlab.cli import args as cargs


def _recipe(args):
    from kdlab.lm.recipe import load_lm_recipe

    ov = cargs.recipe_overrides(args, with_data_dir=False)
    if getattr(args, "device_given", False):
        ov.append(f"teacher.train.device={args.device}")
    return load_lm_recipe(args.recipe, ov)


def _out(args, recipe) -> Path:
    return Path(args.out) if args.out else Path("runs") / "lm" / recipe.name.replace("/", "_")


def cmd_train_teacher(args) -> int:
    from kdlab.lm.study import train_teacher

    r = _recipe(args)
    if r.task == "arithmetic":
        raise ValueError("the arithmetic teacher is trained by `kdlab lm ablate lm/arithmetic`")
    path = train_teacher(r, _out(args, r), progress=cargs.progress(args))
    print(json.dumps({"teacher": str(path)}))
    return 0


def cmd_distill(args) -> int:
    from kdlab.lm.study import distill_run

    r = _recipe(args)
    if r.task == "arithmetic":
        raise ValueError("arithmetic students are trained by `kdlab lm ablate lm/arithmetic`")
    method = args.method or "distill"
    rr = r.method(args.method) if args.method else r
    row = distill_run(rr, _out(args, r), seed=args.seed, method=method, progress=cargs.progress(args))
    print(json.dumps({k: v for k, v in row.items() if k != "counts"}, default=str))
    return 0


def cmd_ablate(args) -> int:
    from kdlab.lm.study import run_ablation, run_arithmetic

    r = _recipe(args)
    out = _out(args, r)
    if r.task == "arithmetic":
        run_arithmetic(r, out, seeds=args.seeds, progress=cargs.progress(args))
    else:
        methods = [m for m in args.methods.split(",") if m] if args.methods else None
        run_ablation(r, out, seeds=args.seeds, methods=methods, progress=cargs.progress(args))
    return 0


def cmd_generate(args) -> int:
    import torch

    from kdlab.lm.generate import generate
    from kdlab.lm.study import load_lm

    model, tok, _ = load_lm(args.checkpoint)
    ids = tok.encode(args.prompt)
    if not ids:
        raise ValueError("--prompt must not be empty")
    limit = getattr(model, "max_len", None)
    if limit is not None and len(ids) + args.max_new > limit:
        raise ValueError(f"prompt ({len(ids)} tokens) + --max-new {args.max_new} exceeds the model's "
                         f"max_len {limit}; shorten the prompt or lower --max-new")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (got {args.temperature}); 0 is greedy")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1 (got {args.top_k}); leave it out to sample from every token")
    gen = torch.Generator().manual_seed(args.seed)
    out, mask = generate(model, torch.tensor([ids]), args.max_new, greedy=args.temperature == 0,
                         temperature=args.temperature or 1.0, top_k=args.top_k, eos_id=tok.eos_id,
                         pad_id=tok.pad_id, use_cache=not args.no_kv_cache, generator=gen)
    new = out[0, len(ids):][mask[0]].tolist()
    print(args.prompt + tok.decode(new))
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
        cargs.add_set(q, "the LM recipe")
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

    q = lsub.add_parser("ablate", help="paired multi-seed study: CE vs divergences vs seq-level vs on-policy")
    common(q)
    cargs.add_seeds(q)
    q.add_argument("--methods", help="comma-separated subset of the recipe's study.methods")
    q.set_defaults(func=cmd_ablate)

    q = lsub.add_parser("generate", help="continue a prompt with a trained LM")
    q.add_argument("checkpoint", help="an LM run's best.pt (OUT/teacher/best.pt or OUT/runs/<method>/seed<k>/best.pt)")
    q.add_argument("--prompt", required=True, help="the text to continue")
    q.add_argument("--max-new", type=cargs.POSITIVE, default=64, help="tokens to generate (default %(default)s)")
    q.add_argument("--temperature", type=cargs.number(0), default=0.0, help="0 = greedy (default); > 0 samples")
    q.add_argument("--top-k", type=cargs.POSITIVE, default=None, help="sample among the k most likely tokens (default: all)")
    q.add_argument("--seed", type=cargs.SEED, default=0, help="sampling seed (default %(default)s)")
    q.add_argument("--no-kv-cache", action="store_true", help="recompute the whole prefix every step")
    q.set_defaults(func=cmd_generate)
