"""``kdlab profile | prune | quantize | export | deploy``: measuring and compressing models.

Registered in :data:`kdlab.cli.main.EXTENSIONS` as ``kdlab.cli.compress:register``. Every command
prints a Markdown table and writes CSV/JSON/Markdown under ``--out-dir`` (default
``runs/compress/<name>``); derived models are kdlab checkpoints readable by
:func:`kdlab.compress.load_compressed`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


# --------------------------------------------------------------------------- shared options
def _common(p: argparse.ArgumentParser, *, data: bool = True, latency: bool = True) -> None:
    g = p.add_argument_group("common")
    g.add_argument("--out-dir", default=None, help="where tables (csv/json/md) and models go "
                                                  "(default runs/compress/<name>)")
    g.add_argument("--device", default="cpu", help="cpu, cuda or auto (GPU when present) for "
                                                   "PyTorch timing and fine-tuning (default cpu)")
    g.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: as is)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    if data:
        g.add_argument("--dataset", default=None,
                       help="digits, cifar10 or cifar100 (default: the checkpoint's dataset)")
        g.add_argument("--data-dir", default=None, help="where CIFAR pickles live")
        g.add_argument("--batch-size", type=int, default=128)
    if latency:
        g.add_argument("--warmup", type=int, default=10, help="untimed runs before timing")
        g.add_argument("--repeats", type=int, default=50, help="timed runs (median and p90)")
        g.add_argument("--latency-batch", type=int, default=32,
                       help="the larger batch timed besides batch 1 (throughput); default 32 "
                            "(deploy: 256 for images of at most 16 px, else 32)")


def _setup(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)


def _out_dir(args, name: str) -> Path:
    return Path(args.out_dir) if args.out_dir else Path("runs") / "compress" / name


def _stem(path: str) -> str:
    p = Path(path)
    if p.suffix in (".pt", ".onnx"):
        # runs/study/method/seed0/best.pt -> method-seed0-best
        parts = [q for q in p.with_suffix("").parts[-3:] if q not in (".", "runs")]
        return "-".join(parts)
    return p.name


def _load(path: str, device):
    from kdlab.compress import load_compressed

    return load_compressed(path, device)


def _data(args, ck):
    from kdlab.compress.pipeline import check_fits, make_loaders

    dataset = args.dataset or ck.get("dataset")
    if not dataset:
        raise ValueError("the checkpoint names no dataset; pass --dataset")
    info, tr, va, te = make_loaders(dataset, args.data_dir, batch_size=args.batch_size,
                                    seed=args.seed, device=args.device_obj)
    check_fits(ck, info, "the checkpoint")
    return info, tr, va, te


def _device(args):
    from kdlab.evaluate.efficiency import resolve_device

    args.device_obj = resolve_device(args.device)
    return args.device_obj


def _teacher_for(args, student, device):
    """KD target for fine-tuning: the unpruned model itself ('self'), --teacher, or None."""
    if args.distill == "none":
        return None
    if args.distill == "self":
        return student
    if not args.teacher:
        raise ValueError("--distill teacher needs --teacher <checkpoint>")
    t, _ = _load(args.teacher, device)
    return t


def _print(md: str, out: Path) -> None:
    print(md)
    print(f"\nwritten to {out}/")


# --------------------------------------------------------------------------- profile
def cmd_profile(args) -> int:
    from kdlab.compress import input_shape_of
    from kdlab.compress.export import OnnxModel
    from kdlab.compress.pipeline import markdown_table, write_report
    from kdlab.evaluate import efficiency as eff

    _setup(args)
    dev = _device(args)
    target = args.target
    path = Path(target)
    file = None
    if path.suffix in (".pt", ".onnx") or path.exists():
        model, ck = _load(target, dev)
        file = path
        shape = (tuple(ck["input_shape"]) if ck.get("format") == "onnx" and args.input_size is None
                 else input_shape_of(ck, args.input_size))
        name = _stem(target)
    else:
        from kdlab.models import create_model

        model = create_model(target, num_classes=args.num_classes, in_channels=args.in_channels)
        shape = (args.in_channels, args.input_size or 32, args.input_size or 32)
        name = target
    out = _out_dir(args, name)
    bs = (1, args.latency_batch)
    row: dict = {"model": name, "input": "x".join(map(str, shape))}
    meta: dict = {"target": target, "input_shape": list(shape)}
    if isinstance(model, OnnxModel):
        row["file_mb"] = eff.file_size_mb(file)
        lats = [] if args.no_latency else [
            eff.measure_latency(model, (1,) + shape, batch_size=b, warmup=args.warmup,
                                repeats=args.repeats, device="cpu") for b in bs]
        prof = {"latency": lats, "file_mb": row["file_mb"]}
        row["runtime"] = "onnxruntime cpu"
    else:
        prof = eff.profile_model(model, shape, batch_sizes=bs, warmup=args.warmup,
                                 repeats=args.repeats, device=str(dev),
                                 latency=not args.no_latency, per_layer=args.per_layer, path=file)
        row.update(params=prof["params_total"], trainable=prof["params_trainable"],
                   mflops=prof["flops"] / 1e6, mmacs=prof["macs"] / 1e6,
                   **{f"mem_{k}_mb": v for k, v in prof["memory_mb"].items()})
        if "file_mb" in prof:
            row["file_mb"] = prof["file_mb"]
        row["runtime"] = f"torch {dev.type}"
    for lat in prof.get("latency", []):
        b = lat["batch_size"]
        row[f"lat_b{b}_ms"] = lat["median_ms"]
        row[f"lat_b{b}_p90_ms"] = lat["p90_ms"]
        row[f"img_s_b{b}"] = lat["images_per_s"]
        row["threads"] = lat["threads"]
    meta["profile"] = prof
    # vertical table: one metric per line reads best for a single model
    vertical = [{"metric": k, "value": v} for k, v in row.items()]
    md = write_report(out, "profile", [row], meta=meta)
    md = markdown_table(vertical, ["metric", "value"])
    notes = ["FLOPs = 2 x MACs, per sample, counted by torch.utils.flop_counter "
             "(conv/matmul only; bias, BN, activations not counted)",
             "memory per dtype = parameters x bytes (fp32 4, fp16/bf16 2, int8 1); MB = 10^6 bytes"]
    if prof.get("latency"):
        notes.append(f"latency: median/p90 over {args.repeats} runs after {args.warmup} warm-up, "
                     f"{prof['latency'][0]['threads']} thread(s), device {prof['latency'][0]['device']}")
    md += "\n\n" + "\n".join(f"- {n}" for n in notes)
    if args.per_layer and "per_layer" in prof:
        layers = [{"layer": r["name"], "type": r["type"], "MFLOPs": r["flops"] / 1e6,
                   "MMACs": r["macs"] / 1e6,
                   "share %": 100.0 * r["flops"] / max(prof["flops"], 1)} for r in prof["per_layer"]]
        write_report(out, "profile_layers", layers)
        md += "\n\n" + markdown_table(layers)
    (out / "profile.md").write_text(md + "\n")
    _print(md, out)
    return 0


# --------------------------------------------------------------------------- prune
def cmd_prune(args) -> int:
    from kdlab.compress import save_compressed
    from kdlab.compress.finetune import evaluate_accuracy, finetune
    from kdlab.compress.pipeline import measure, write_report
    from kdlab.compress.prune import layer_specs, prune_iterative, sparsity_report

    _setup(args)
    dev = _device(args)
    model, ck = _load(args.checkpoint, dev)
    if not isinstance(model, torch.nn.Module):
        raise ValueError("prune needs a PyTorch checkpoint (.pt), not an ONNX file")
    info, tr, va, te = _data(args, ck)
    shape = (info.in_channels, info.image_size, info.image_size)
    name = _stem(args.checkpoint)
    out = _out_dir(args, f"{name}-prune")
    kd = _teacher_for(args, model, dev)
    if args.scope is None:
        args.scope = "local" if args.method == "structured" else "global"

    def ft(m, masks):
        if args.finetune_epochs <= 0:
            return None
        h = finetune(m, tr, epochs=args.finetune_epochs, lr=args.lr, teacher=kd, alpha=args.alpha,
                     T=args.T, masks=masks, seed=args.seed, device=dev, progress=not args.quiet,
                     max_steps=args.max_steps)
        return {"loss": h[-1]["loss"], "val_acc": evaluate_accuracy(m, va, dev)}

    batches_fn = lambda: ((x, y) for x, y, _ in tr.epoch(0))
    pruned, masks, hist = prune_iterative(
        model, args.sparsity, steps=args.steps, method=args.method, scope=args.scope,
        importance=args.importance, input_shape=shape, batches_fn=batches_fn, finetune_fn=ft,
        schedule=args.schedule, include_classifier=not args.skip_classifier,
        max_batches=args.importance_batches, progress=not args.quiet)
    pruned.eval()
    info_p = {"method": args.method, "importance": args.importance, "scope": args.scope,
              "steps": args.steps, "schedule": args.schedule,
              "finetune_epochs": args.finetune_epochs, "distill": args.distill, "history": hist}
    if args.method == "structured":
        info_p.update(ratio=args.sparsity, arch=layer_specs(pruned))
    else:
        rep = sparsity_report(pruned)
        info_p.update(sparsity=args.sparsity, achieved=rep["sparsity"], zeros=rep["zeros"],
                      total=rep["total"])
    tag = int(round(args.sparsity * 100))
    out_ckpt = Path(args.out) if args.out else out / f"pruned_{args.method}{tag}.pt"
    save_compressed(pruned, out_ckpt, ck, pruned=info_p, input_shape=list(shape))
    ref_file = out / "original.pt"
    save_compressed(model, ref_file, ck, input_shape=list(shape))
    common = dict(input_shape=shape, test_loader=te, device=dev,
                  batch_sizes=(1, args.latency_batch), warmup=args.warmup, repeats=args.repeats)
    rows = [measure(model, name="original", file=ref_file, runtime=f"torch {dev.type}", **common),
            measure(pruned, name=f"pruned {tag}% ({args.method}, {args.importance}, {args.scope})",
                    file=out_ckpt, runtime=f"torch {dev.type}", **common)]
    for r, m in zip(rows, (model, pruned)):
        r["weight_sparsity"] = 100.0 * sparsity_report(m)["sparsity"]
    notes = [f"pruned checkpoint: {out_ckpt} (load with kdlab.compress.load_compressed)"]
    if args.method == "unstructured":
        notes.append("unstructured zeros are stored densely: file size, FLOPs and latency do not "
                     "drop; use --method structured for a smaller, faster network")
    md = write_report(out, "prune", rows,
                      ["model", "acc", "params", "weight_sparsity", "size_mb", "mflops",
                       "lat_b1_ms", "lat_b1_p90_ms", f"img_s_b{args.latency_batch}"],
                      {"acc": "test acc %", "weight_sparsity": "zero weights %",
                       "size_mb": "size MB", "mflops": "MFLOPs", "lat_b1_ms": "latency b1 ms",
                       "lat_b1_p90_ms": "p90 b1 ms",
                       f"img_s_b{args.latency_batch}": f"img/s b{args.latency_batch}"},
                      meta={"checkpoint": args.checkpoint, "pruned": {k: v for k, v in info_p.items()
                                                                      if k != "arch"}},
                      notes=notes)
    _print(md, out)
    return 0


# --------------------------------------------------------------------------- quantize
def cmd_quantize(args) -> int:
    from kdlab.compress import save_compressed
    from kdlab.compress.export import OnnxModel, check_onnx, export_onnx
    from kdlab.compress.finetune import evaluate_accuracy, finetune
    from kdlab.compress.pipeline import measure, write_report
    from kdlab.compress.quantize import (calibrate, fake_quant_config, prepare_fake_quant,
                                         quantize_onnx_static, set_observing)

    _setup(args)
    dev = _device(args)
    model, ck = _load(args.checkpoint, dev)
    if not isinstance(model, torch.nn.Module):
        raise ValueError("quantize needs a PyTorch checkpoint (.pt), not an ONNX file")
    info, tr, va, te = _data(args, ck)
    shape = (info.in_channels, info.image_size, info.image_size)
    name = _stem(args.checkpoint)
    out = _out_dir(args, f"{name}-quantize")
    act_bits = None if args.act_bits in ("none", "fp", "0") else int(args.act_bits)
    calib = lambda: [(x, y) for _, (x, y, _) in zip(range(args.calib_batches), tr.epoch(0))]
    base_acc = evaluate_accuracy(model, te, dev)
    notes = []
    if args.mode == "fake":
        rows = [{"model": "fp32", "weight_bits": 32, "act_bits": 32, "acc": 100 * base_acc}]
        for b in args.bits:
            fq = prepare_fake_quant(model, b, act_bits,
                                    per_channel=not args.per_tensor,
                                    weight_symmetric=not args.asymmetric_weights,
                                    act_symmetric=args.symmetric_activations)
            calibrate(fq, calib())
            rows.append({"model": f"fake-quant w{b}" + ("" if act_bits is None else f"/a{act_bits}"),
                         "weight_bits": b, "act_bits": act_bits or 32,
                         "acc": 100 * evaluate_accuracy(fq, te, dev)})
        notes.append("fake quantization: weights and activations rounded to b bits in float "
                     "arithmetic; measures accuracy only (no speed-up)")
        md = write_report(out, "quantize", rows, ["model", "weight_bits", "act_bits", "acc"],
                          {"acc": "test acc %"}, meta={"checkpoint": args.checkpoint}, notes=notes)
    elif args.mode == "static":
        from kdlab.compress.quantize import QuantWrapper, strip_fake_quant

        if any(isinstance(m, QuantWrapper) for m in model.modules()):
            model = strip_fake_quant(model, bake=True)  # QAT weights, float graph for ORT
            notes.append("started from a fake-quant checkpoint: its quantized weights were baked in")
        mcpu = model.cpu().eval()
        fp32 = export_onnx(mcpu, out / "model_fp32.onnx", shape)
        chk = check_onnx(mcpu, fp32, shape)
        int8 = quantize_onnx_static(fp32, Path(args.out) if args.out else out / "model_int8.onnx",
                                    calib(), per_channel=not args.per_tensor, fmt=args.format,
                                    method=args.calibration,
                                    activation_symmetric=args.symmetric_activations)
        common = dict(input_shape=shape, test_loader=te, device="cpu",
                      batch_sizes=(1, args.latency_batch), warmup=args.warmup, repeats=args.repeats)
        rows = [measure(OnnxModel(fp32), name="fp32 (ONNX)", file=fp32, flops_model=mcpu,
                        runtime="onnxruntime cpu", **common),
                measure(OnnxModel(int8), name="int8 (ONNX static)", file=int8, flops_model=mcpu,
                        runtime="onnxruntime cpu", **common)]
        f, q = rows
        notes += [f"int8 file {f['size_mb'] / q['size_mb']:.2f}x smaller; latency b1 "
                  f"x{q['lat_b1_ms'] / f['lat_b1_ms']:.2f} of fp32 ONNX",
                  f"export check: max |onnx - torch| = {chk['max_abs_diff']:.2e}",
                  f"int8 model: {int8}"]
        md = write_report(out, "quantize", rows,
                          ["model", "runtime", "acc", "params", "size_mb", "mflops", "lat_b1_ms",
                           "lat_b1_p90_ms", f"img_s_b{args.latency_batch}"],
                          {"acc": "test acc %", "size_mb": "size MB", "mflops": "MFLOPs",
                           "lat_b1_ms": "latency b1 ms", "lat_b1_p90_ms": "p90 b1 ms",
                           f"img_s_b{args.latency_batch}": f"img/s b{args.latency_batch}"},
                          meta={"checkpoint": args.checkpoint, "onnx_check": chk}, notes=notes)
    else:  # qat
        b = args.bits[0]
        qat = prepare_fake_quant(model, b, act_bits,
                                 per_channel=not args.per_tensor,
                                 weight_symmetric=not args.asymmetric_weights,
                                 act_symmetric=args.symmetric_activations)
        calibrate(qat, calib())
        before = evaluate_accuracy(qat, te, dev)
        kd = _teacher_for(args, model, dev)
        set_observing(qat, True)
        finetune(qat, tr, epochs=args.epochs, lr=args.lr, teacher=kd, alpha=args.alpha, T=args.T,
                 seed=args.seed, device=dev, progress=not args.quiet, desc="QAT",
                 max_steps=args.max_steps)
        set_observing(qat, False)
        after = evaluate_accuracy(qat, te, dev)
        out_ckpt = Path(args.out) if args.out else out / f"qat_w{b}.pt"
        save_compressed(qat, out_ckpt, ck, quantized=fake_quant_config(qat), input_shape=list(shape))
        rows = [{"model": "fp32", "acc": 100 * base_acc},
                {"model": f"fake-quant w{b} (calibrated, before QAT)", "acc": 100 * before},
                {"model": f"QAT w{b} ({args.epochs} epoch(s), distill={args.distill})",
                 "acc": 100 * after}]
        notes.append(f"QAT checkpoint: {out_ckpt} (load with kdlab.compress.load_compressed)")
        md = write_report(out, "quantize", rows, ["model", "acc"], {"acc": "test acc %"},
                          meta={"checkpoint": args.checkpoint}, notes=notes)
    _print(md, out)
    return 0


# --------------------------------------------------------------------------- export
def cmd_export(args) -> int:
    from kdlab.compress import input_shape_of
    from kdlab.compress.export import check_onnx, export_onnx
    from kdlab.compress.quantize import QuantWrapper, strip_fake_quant
    from kdlab.compress.pipeline import write_report
    from kdlab.evaluate.efficiency import file_size_mb

    _setup(args)
    model, ck = _load(args.checkpoint, "cpu")
    if not isinstance(model, torch.nn.Module):
        raise ValueError("export needs a PyTorch checkpoint (.pt)")
    notes = []
    if any(isinstance(m, QuantWrapper) for m in model.modules()):
        model = strip_fake_quant(model, bake=True)
        notes.append("fake-quant layers removed; their quantized weights are exported in float "
                     "(run kdlab quantize --mode static for a real int8 model)")
    shape = input_shape_of(ck, args.input_size)
    name = _stem(args.checkpoint)
    out = _out_dir(args, f"{name}-export")
    path = Path(args.out) if args.out else out / "model.onnx"
    export_onnx(model, path, shape, opset=args.opset)
    chk = check_onnx(model, path, shape, atol=args.atol, rtol=args.rtol)
    row = {"onnx": str(path), "size_mb": file_size_mb(path), "max_abs_diff": chk["max_abs_diff"],
           "argmax_agree": chk["argmax_agree"], "ok": chk["ok"]}
    md = write_report(out, "export", [row], meta={"checkpoint": args.checkpoint, "check": chk},
                      notes=notes + [f"ok = |onnx - torch| <= {args.atol} + {args.rtol}|torch| "
                                     f"on {chk['batch_size']} random inputs (ONNX Runtime)"])
    _print(md, out)
    if not chk["ok"]:
        print(f"kdlab: error: ONNX output differs from PyTorch by {chk['max_abs_diff']:.2e}",
              file=sys.stderr)
        return 1
    return 0


# --------------------------------------------------------------------------- deploy
def cmd_deploy(args) -> int:
    from kdlab.compress.pipeline import deploy

    _setup(args)
    out = _out_dir(args, f"{_stem(args.student)}-deploy")
    res = deploy(args.student, args.teacher, dataset=args.dataset, data_dir=args.data_dir,
                 out_dir=out, sparsities=args.sparsities, prune_method=args.method,
                 importance=args.importance, scope=args.scope, steps=args.steps,
                 finetune_epochs=args.finetune_epochs, lr=args.lr, distill=args.distill,
                 alpha=args.alpha, T=args.T, calib_batches=args.calib_batches,
                 quant_format=args.format, batch_size=args.batch_size,
                 latency_batch=args.latency_batch, warmup=args.warmup, repeats=args.repeats,
                 device=args.device, seed=args.seed, max_steps=args.max_steps,
                 progress=not args.quiet, log=lambda s: print(s, file=sys.stderr))
    _print(res["markdown"], out)
    return 0


# --------------------------------------------------------------------------- registration
def _finetune_opts(p, *, epochs_flag="--finetune-epochs", epochs=3, lr=0.01, distill="self"):
    g = p.add_argument_group("fine-tuning")
    g.add_argument(epochs_flag, dest="finetune_epochs" if "finetune" in epochs_flag else "epochs",
                   type=int, default=epochs)
    g.add_argument("--lr", type=float, default=lr)
    g.add_argument("--distill", choices=["none", "self", "teacher"], default=distill,
                   help="KD target while fine-tuning: none, the uncompressed model itself "
                        "('self'), or --teacher")
    g.add_argument("--teacher", default=None, help="teacher checkpoint for --distill teacher")
    g.add_argument("--alpha", type=float, default=0.9, help="weight of the KD term")
    g.add_argument("--T", type=float, default=4.0, help="KD temperature")
    g.add_argument("--max-steps", type=int, default=None, help=argparse.SUPPRESS)


def register(sub) -> None:
    p = sub.add_parser("profile", help="parameters, memory per dtype, file size, FLOPs and "
                                       "latency of a checkpoint, ONNX file or model name")
    p.add_argument("target", help="checkpoint (.pt), ONNX file, or registry model name")
    p.add_argument("--input-size", type=int, default=None, help="image side (default: dataset's, "
                                                                "32 for a model name)")
    p.add_argument("--num-classes", type=int, default=10, help="for a model name")
    p.add_argument("--in-channels", type=int, default=3, help="for a model name")
    p.add_argument("--per-layer", action="store_true", help="FLOPs per layer too")
    p.add_argument("--no-latency", action="store_true", help="skip timing")
    _common(p, data=False)
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("prune", help="unstructured or structured (channel) pruning, one-shot or "
                                     "iterative, with (distilled) fine-tuning")
    p.add_argument("checkpoint")
    p.add_argument("--sparsity", type=float, required=True,
                   help="fraction of weights (unstructured) or channels (structured) removed")
    p.add_argument("--method", choices=["unstructured", "structured"], default="unstructured")
    p.add_argument("--scope", choices=["global", "local"], default=None,
                   help="one ranking over all layers, or per layer (default: global for "
                        "unstructured, local for structured)")
    p.add_argument("--importance", choices=["magnitude", "gradient"], default="magnitude",
                   help="|w|, or |w x grad| accumulated over batches")
    p.add_argument("--steps", type=int, default=1, help="iterative: prune/fine-tune stages")
    p.add_argument("--schedule", choices=["linear", "cubic"], default="linear")
    p.add_argument("--importance-batches", type=int, default=8)
    p.add_argument("--skip-classifier", action="store_true", help="never prune the classifier")
    p.add_argument("--out", default=None, help="pruned checkpoint path")
    _finetune_opts(p, epochs=0)
    _common(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("quantize", help="fake quantization (accuracy at b bits), int8 static "
                                        "(ONNX Runtime) or quantization-aware fine-tuning")
    p.add_argument("checkpoint")
    p.add_argument("--mode", choices=["fake", "static", "qat"], default="fake")
    p.add_argument("--bits", type=int, nargs="+", default=[8], help="weight bits (fake: a list)")
    p.add_argument("--act-bits", default="8", help="activation bits, or 'none' for float")
    p.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor")
    p.add_argument("--asymmetric-weights", action="store_true")
    p.add_argument("--symmetric-activations", action="store_true")
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--calibration", choices=["minmax", "entropy", "percentile"], default="minmax")
    p.add_argument("--format", choices=["qdq", "qoperator"], default="qdq")
    p.add_argument("--out", default=None, help="output file (int8 .onnx or QAT .pt)")
    _finetune_opts(p, epochs_flag="--epochs", epochs=1, lr=0.001, distill="none")
    _common(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("export", help="export a checkpoint to ONNX and check it in ONNX Runtime")
    p.add_argument("checkpoint")
    p.add_argument("--out", default=None, help="ONNX path (default <out-dir>/model.onnx)")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--rtol", type=float, default=1e-3)
    p.add_argument("--input-size", type=int, default=None)
    _common(p, data=False, latency=False)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("deploy", help="teacher, student, pruned students and int8 student: "
                                      "accuracy, size, FLOPs, latency in one table")
    p.add_argument("--student", required=True, help="student checkpoint, e.g. "
                                                    "runs/<study>/<method>/seed0/best.pt")
    p.add_argument("--teacher", required=True, help="teacher checkpoint")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.6],
                   help="pruning levels (fraction of channels removed)")
    p.add_argument("--method", choices=["structured", "unstructured"], default="structured")
    p.add_argument("--importance", choices=["magnitude", "gradient"], default="magnitude")
    p.add_argument("--scope", choices=["local", "global"], default="local")
    p.add_argument("--steps", type=int, default=1, help="iterative pruning stages")
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.05, help="fine-tuning learning rate (cosine)")
    p.add_argument("--distill", choices=["student", "teacher", "none"], default="student",
                   help="KD target while fine-tuning pruned students (default: unpruned student)")
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--T", type=float, default=4.0)
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--format", choices=["qdq", "qoperator"], default="qdq")
    p.add_argument("--max-steps", type=int, default=None, help=argparse.SUPPRESS)
    _common(p)
    p.set_defaults(func=cmd_deploy, latency_batch=None)


__all__ = ["register", "cmd_profile", "cmd_prune", "cmd_quantize", "cmd_export", "cmd_deploy"]
