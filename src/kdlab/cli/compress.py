"""``kdlab profile | prune | quantize | export | deploy``: measuring and compressing models.

Each command parses its options and calls one function of :mod:`kdlab.compress.api`, which
writes CSV/JSON/Markdown under ``--out`` (default ``runs/compress/<name>``) and returns the
table printed here. Derived models (``--model-out``) are kdlab checkpoints readable by
:func:`kdlab.compress.load_compressed`.
"""

from __future__ import annotations

import argparse
import sys

from kdlab.cli import args as A


# --------------------------------------------------------------------------- shared options
def _common(p: argparse.ArgumentParser, *, data: bool = True, latency: bool = True,
            device: bool = True) -> None:
    g = p.add_argument_group("common")
    A.add_out(g, "runs/compress/<name>")
    if device:
        A.add_device(g)
    g.add_argument("--threads", type=A.POSITIVE, default=None,
                   help="torch.set_num_threads (default: as is)")
    g.add_argument("--seed", type=A.SEED, default=0,
                   help="seed of data order, fine-tuning and calibration draws (default 0)")
    A.add_quiet(g)
    if data:
        g.add_argument("--dataset", default=None,
                       help="digits, cifar10 or cifar100 (default: the checkpoint's dataset)")
        A.add_data_dir(g)
        g.add_argument("--batch-size", type=A.POSITIVE, default=128,
                       help="batch size of evaluation and fine-tuning (default 128)")
        g.add_argument("--allow-other-dataset", action="store_true",
                       help="use a checkpoint (or --teacher) trained on another data set than --dataset")
    if latency:
        g.add_argument("--warmup", type=A.COUNT, default=10, help="untimed runs before timing (default 10)")
        g.add_argument("--repeats", type=A.POSITIVE, default=50, help="timed runs, median and p90 (default 50)")
        g.add_argument("--latency-batch", type=A.POSITIVE, default=32,
                       help="the larger batch timed besides batch 1 (throughput); default 32 "
                            "(deploy: 256 for images of at most 16 px, else 32)")


def _common_kwargs(args, *, data: bool = True, latency: bool = True) -> dict:
    kw = dict(out_dir=args.out, threads=args.threads, seed=args.seed)
    if data:
        kw.update(dataset=args.dataset, data_dir=args.data_dir, batch_size=args.batch_size,
                  allow_other_dataset=args.allow_other_dataset)
    if latency:
        kw.update(warmup=args.warmup, repeats=args.repeats, latency_batch=args.latency_batch)
    return kw


def _finetune_opts(p, *, epochs_flag="--finetune-epochs", epochs=3, lr=0.01, distill="self"):
    g = p.add_argument_group("fine-tuning")
    g.add_argument(epochs_flag, dest="finetune_epochs" if "finetune" in epochs_flag else "epochs",
                   type=A.COUNT, default=epochs, help=f"fine-tuning epochs (default {epochs})")
    g.add_argument("--lr", type=A.number(0, lo_open=True), default=lr, help=f"fine-tuning learning rate (default {lr})")
    g.add_argument("--distill", choices=["none", "self", "teacher"], default=distill,
                   help="KD target while fine-tuning: none, the uncompressed model itself "
                        f"('self'), or --teacher (default {distill})")
    g.add_argument("--teacher", default=None, help="teacher checkpoint for --distill teacher")
    g.add_argument("--alpha", type=A.FRACTION, default=0.9, help="weight of the KD term (default 0.9)")
    g.add_argument("--T", type=A.number(0, lo_open=True), default=4.0, help="KD temperature (default 4)")
    g.add_argument("--max-steps", type=A.POSITIVE, default=None, help=argparse.SUPPRESS)


def _print(res: dict) -> None:
    print(res["markdown"])
    print(f"\nwritten to {res['out_dir']}/")


# --------------------------------------------------------------------------- commands
def cmd_profile(args) -> int:
    from kdlab.compress.api import profile_target

    _print(profile_target(
        args.target, input_size=args.input_size, num_classes=args.num_classes,
        in_channels=args.in_channels, per_layer=args.per_layer, latency=not args.no_latency,
        device=args.device, **_common_kwargs(args, data=False)))
    return 0


def cmd_prune(args) -> int:
    from kdlab.compress.api import prune_checkpoint

    _print(prune_checkpoint(
        args.checkpoint, args.sparsity, method=args.method, scope=args.scope,
        importance=args.importance, steps=args.steps, schedule=args.schedule,
        importance_batches=args.importance_batches, include_classifier=not args.skip_classifier,
        finetune_epochs=args.finetune_epochs, lr=args.lr, distill=args.distill,
        teacher=args.teacher, alpha=args.alpha, T=args.T, max_steps=args.max_steps,
        model_out=args.model_out, device=args.device, progress=A.progress(args),
        **_common_kwargs(args)))
    return 0


def cmd_quantize(args) -> int:
    from kdlab.compress.api import quantize_checkpoint

    _print(quantize_checkpoint(
        args.checkpoint, mode=args.mode, bits=args.bits, act_bits=args.act_bits,
        per_channel=not args.per_tensor, weight_symmetric=not args.asymmetric_weights,
        act_symmetric=args.symmetric_activations, calib_batches=args.calib_batches,
        calibration=args.calibration, fmt=args.format, epochs=args.epochs, lr=args.lr,
        distill=args.distill, teacher=args.teacher, alpha=args.alpha, T=args.T,
        max_steps=args.max_steps, model_out=args.model_out, device=args.device,
        progress=A.progress(args), **_common_kwargs(args)))
    return 0


def cmd_export(args) -> int:
    from kdlab.compress.api import export_checkpoint

    res = export_checkpoint(args.checkpoint, model_out=args.model_out, opset=args.opset,
                            atol=args.atol, rtol=args.rtol, input_size=args.input_size,
                            fmt=args.format, **_common_kwargs(args, data=False, latency=False))
    _print(res)
    if not res["ok"] and args.format == "safetensors":
        print(f"kdlab: error: {res['model']} does not read back bit-identical; re-run the export",
              file=sys.stderr)
        return 1
    if not res["ok"]:
        print(f"kdlab: error: ONNX output differs from PyTorch by "
              f"{res['check']['max_abs_diff']:.2e}", file=sys.stderr)
        return 1
    return 0


def cmd_deploy(args) -> int:
    from kdlab.compress.api import deploy_checkpoints

    _print(deploy_checkpoints(
        args.student, args.teacher, sparsities=args.sparsities, prune_method=args.method,
        importance=args.importance, scope=args.scope, steps=args.steps,
        finetune_epochs=args.finetune_epochs, lr=args.lr, distill=args.distill,
        alpha=args.alpha, T=args.T, calib_batches=args.calib_batches, quant_format=args.format,
        device=args.device, max_steps=args.max_steps, progress=A.progress(args),
        log=lambda s: print(s, file=sys.stderr), **_common_kwargs(args)))
    return 0


# --------------------------------------------------------------------------- registration
def register(sub) -> None:
    p = sub.add_parser("profile", help="parameters, memory per dtype, file size, FLOPs and "
                                       "latency of a checkpoint, ONNX file or model name")
    p.add_argument("target", help="checkpoint (.pt or .safetensors), ONNX file, or registry model name")
    p.add_argument("--input-size", type=A.POSITIVE, default=None,
                   help="image side (default: the dataset's, 32 for a model name)")
    p.add_argument("--num-classes", type=A.whole(2), help="for a model name (default 10)")
    p.add_argument("--in-channels", type=A.POSITIVE, help="for a model name (default 3)")
    p.add_argument("--per-layer", action="store_true", help="FLOPs per layer too")
    p.add_argument("--no-latency", action="store_true", help="skip timing")
    _common(p, data=False)
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("prune", help="unstructured or structured (channel) pruning, one-shot or "
                                     "iterative, with (distilled) fine-tuning")
    p.add_argument("checkpoint", help="model checkpoint (.pt or .safetensors)")
    p.add_argument("--sparsity", type=A.number(0, 1, hi_open=True), required=True,
                   help="fraction of weights (unstructured) or channels (structured) removed")
    p.add_argument("--method", choices=["unstructured", "structured"], default="unstructured",
                   help="zero single weights, or remove whole channels (default unstructured)")
    p.add_argument("--scope", choices=["global", "local"], default=None,
                   help="one ranking over all layers, or per layer (default: global for "
                        "unstructured, local for structured)")
    p.add_argument("--importance", choices=["magnitude", "gradient"], default="magnitude",
                   help="|w|, or |w x grad| accumulated over batches (default magnitude)")
    p.add_argument("--steps", type=A.POSITIVE, default=1, help="iterative: prune/fine-tune stages (default 1)")
    p.add_argument("--schedule", choices=["linear", "cubic"], default="linear",
                   help="sparsity schedule over the stages (default linear)")
    p.add_argument("--importance-batches", type=A.POSITIVE, default=8,
                   help="batches for gradient importance (default 8)")
    p.add_argument("--skip-classifier", action="store_true", help="never prune the classifier")
    p.add_argument("--model-out", metavar="FILE", default=None,
                   help="pruned checkpoint path (default <out>/pruned_<method><pct>.pt)")
    _finetune_opts(p, epochs=0)
    _common(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("quantize", help="fake quantization (accuracy at b bits), int8 static "
                                        "(ONNX Runtime) or quantization-aware fine-tuning")
    p.add_argument("checkpoint", help="model checkpoint (.pt or .safetensors)")
    p.add_argument("--mode", choices=["fake", "static", "qat"], default="fake",
                   help="fake (accuracy at b bits), static (int8 ONNX Runtime) or qat "
                        "(quantization-aware fine-tuning); default fake")
    p.add_argument("--bits", type=A.whole(2, 16), nargs="+", default=[8],
                   help="weight bits (fake: a list; default 8)")
    p.add_argument("--act-bits", default="8", type=A.act_bits, help="activation bits, or 'none' for float (default 8)")
    p.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor")
    p.add_argument("--asymmetric-weights", action="store_true",
                   help="asymmetric (zero-point) weight quantization")
    p.add_argument("--symmetric-activations", action="store_true",
                   help="symmetric activation quantization")
    p.add_argument("--calib-batches", type=A.POSITIVE, default=8,
                   help="training batches for calibration (default 8)")
    p.add_argument("--calibration", choices=["minmax", "entropy", "percentile"], default="minmax",
                   help="static: ONNX Runtime calibration method (default minmax)")
    p.add_argument("--format", choices=["qdq", "qoperator"], default="qdq",
                   help="static: ONNX quantized format (default qdq)")
    p.add_argument("--model-out", metavar="FILE", default=None,
                   help="output model (static: int8 .onnx, qat: .pt; default under --out)")
    _finetune_opts(p, epochs_flag="--epochs", epochs=1, lr=0.001, distill="none")
    _common(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("export", help="export a checkpoint to ONNX (checked in ONNX Runtime) or "
                                      "safetensors (weights that cannot run code)")
    p.add_argument("checkpoint", help="model checkpoint (.pt or .safetensors)")
    p.add_argument("--format", choices=["onnx", "safetensors"], default="onnx",
                   help="onnx (default) or safetensors: the weights and the model's identity, no code")
    p.add_argument("--model-out", metavar="FILE", default=None,
                   help="output path (default <out>/model.onnx or <out>/model.safetensors)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--atol", type=A.number(0), default=1e-4, help="absolute tolerance of the check (default 1e-4)")
    p.add_argument("--rtol", type=A.number(0), default=1e-3, help="relative tolerance of the check (default 1e-3)")
    p.add_argument("--input-size", type=A.POSITIVE, default=None,
                   help="image side (default: the checkpoint's)")
    _common(p, data=False, latency=False, device=False)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("deploy", help="teacher, student, pruned students and int8 student: "
                                      "accuracy, size, FLOPs, latency in one table")
    p.add_argument("--student", required=True, help="student checkpoint, e.g. "
                                                    "runs/<study>/<method>/seed0/best.pt")
    p.add_argument("--teacher", required=True, help="teacher checkpoint")
    p.add_argument("--sparsities", type=A.number(0, 1, hi_open=True), nargs="+", default=[0.3, 0.6],
                   help="pruning levels (fraction of channels removed; default 0.3 0.6)")
    p.add_argument("--method", choices=["structured", "unstructured"], default="structured",
                   help="pruning method (default structured)")
    p.add_argument("--importance", choices=["magnitude", "gradient"], default="magnitude",
                   help="pruning importance (default magnitude)")
    p.add_argument("--scope", choices=["local", "global"], default="local",
                   help="pruning scope (default local)")
    p.add_argument("--steps", type=A.POSITIVE, default=1, help="iterative pruning stages (default 1)")
    p.add_argument("--finetune-epochs", type=A.COUNT, default=5,
                   help="fine-tuning epochs of each pruned student (default 5)")
    p.add_argument("--lr", type=A.number(0, lo_open=True), default=0.05, help="fine-tuning learning rate, cosine (default 0.05)")
    p.add_argument("--distill", choices=["student", "teacher", "none"], default="student",
                   help="KD target while fine-tuning pruned students (default: unpruned student)")
    p.add_argument("--alpha", type=A.FRACTION, default=0.9, help="weight of the KD term (default 0.9)")
    p.add_argument("--T", type=A.number(0, lo_open=True), default=4.0, help="KD temperature (default 4)")
    p.add_argument("--calib-batches", type=A.POSITIVE, default=8,
                   help="training batches for int8 calibration (default 8)")
    p.add_argument("--format", choices=["qdq", "qoperator"], default="qdq",
                   help="ONNX quantized format (default qdq)")
    p.add_argument("--max-steps", type=A.POSITIVE, default=None, help=argparse.SUPPRESS)
    _common(p)
    p.set_defaults(func=cmd_deploy, latency_batch=None)


__all__ = ["register", "cmd_profile", "cmd_prune", "cmd_quantize", "cmd_export", "cmd_deploy"]
