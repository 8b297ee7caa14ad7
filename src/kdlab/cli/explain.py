"""`kdlab explain`: does a student look where its teacher looks?

    kdlab explain --teacher runs/t/best.pt --student runs/s1/best.pt [--student ...]
                  [--alpha 1.0 --alpha 0.5 ...] --dataset digits --method ig --grid 4 4 --k 5
                  --n-images 256 --out runs/explain --seed 0

Parses the options and calls :func:`kdlab.evaluate.explain_report.explain_checkpoints`; the
report (table, CSV/JSON, overlays, sweep plot) is described there.
"""

from __future__ import annotations

from kdlab.cli import args as A


def register(sub) -> None:
    p = sub.add_parser("explain", help="attribution alignment of students with their teacher "
                                       "(saliency / IG / Grad-CAM), table + overlay PNG")
    p.add_argument("--teacher", required=True, help="teacher checkpoint (best.pt)")
    p.add_argument("--student", action="append", required=True, metavar="CKPT",
                   help="student checkpoint (repeatable)")
    p.add_argument("--alpha", action="append", type=A.FRACTION, metavar="A",
                   help="hard-label weight of each --student, in the same order (repeatable); "
                        "given for every student, sweep.png is drawn")
    p.add_argument("--label", action="append", metavar="NAME",
                   help="display name of each --student, in order (default: model name)")
    p.add_argument("--dataset", help="data set name (default: the teacher checkpoint's)")
    A.add_data_dir(p)
    p.add_argument("--split", choices=["train", "val", "test"], default="test",
                   help="split the images are drawn from (default test)")
    p.add_argument("--method", choices=["saliency", "ig", "gradcam"], default="ig",
                   help="attribution method (default ig)")
    p.add_argument("--target", default="label",
                   help="class explained: label (true), teacher (teacher's prediction), "
                        "pred (each model its own), or a class index")
    p.add_argument("--layer-teacher", help="Grad-CAM layer of the teacher (default: last stage)")
    p.add_argument("--layer-student", help="Grad-CAM layer of the students (default: last stage)")
    p.add_argument("--baseline", choices=["zeros", "mean"], default="zeros",
                   help="IG baseline: zeros (= dataset-mean colour for normalised inputs) or "
                        "each image's mean colour")
    p.add_argument("--steps", type=A.POSITIVE, default=32, help="IG integration steps")
    p.add_argument("--internal-batch-size", type=A.POSITIVE, help="IG: evaluate the path in chunks")
    p.add_argument("--grid", type=A.POSITIVE, nargs=2, default=[4, 4], metavar=("ROWS", "COLS"),
                   help="grid of image parts compared (default 4 4)")
    p.add_argument("--superpixels", type=A.whole(2), metavar="S",
                   help="use ~S SLIC superpixels instead of the grid (needs scikit-image)")
    p.add_argument("--k", type=A.POSITIVE, default=5, help="teacher's top-k parts for the focus metric")
    p.add_argument("--T", type=A.number(0, lo_open=True), default=1.0, help="temperature of the KL metric")
    p.add_argument("--n-images", type=A.POSITIVE, default=256, help="images drawn from the split (seeded)")
    p.add_argument("--n-overlay", type=A.COUNT, default=8, help="images in overlays.png")
    p.add_argument("--batch-size", type=A.POSITIVE, default=64, help="images per forward/backward pass (default 64)")
    A.add_out(p, "runs/explain")
    p.add_argument("--seed", type=A.SEED, default=0, help="seed of the image draw and of the splits (default 0)")
    A.add_device(p)
    p.set_defaults(func=cmd_explain)


def cmd_explain(args) -> int:
    from kdlab.experiments.commands import explain_command

    explain_command(
        args.teacher, args.student, out=args.out, alphas=args.alpha, labels=args.label, dataset=args.dataset,
        data_dir=args.data_dir, split=args.split, n_images=args.n_images, seed=args.seed,
        device=args.device, method=args.method, target=args.target,
        grid=tuple(args.grid), superpixel=args.superpixels, k=args.k, T=args.T,
        baseline=args.baseline, steps=args.steps, internal_batch_size=args.internal_batch_size,
        layer_teacher=args.layer_teacher, layer_student=args.layer_student,
        batch_size=args.batch_size, n_overlay=args.n_overlay)
    return 0
