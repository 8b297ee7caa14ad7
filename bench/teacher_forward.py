"""How fast can a frozen teacher's forward pass be on this CPU? (issue 30: the study's floor)

    OMP_NUM_THREADS=2 PYTHONPATH=src .venv/bin/python bench/teacher_forward.py [--compile] [--threads 2]

A randomly initialised ResNet-56 (running BatchNorm statistics drawn away from 0 / 1, so folding is
not trivial) at batch 64 on generated 3x32x32 inputs, in inference mode, the variants taking turns
for 5 rounds of 5 batches (every round printed, the median counts):

* ``as loaded``: the model as it is (fp32, contiguous) -- a study's default teacher;
* ``folded``: ``kdlab.distill.teachers.fast_teacher``'s copy (BatchNorm folded, channels-last) --
  ``train.fast_teacher: true``;
* ``folded + inductor freezing`` (``--compile``): that copy through ``torch.compile`` with
  ``torch._inductor.config.freezing`` (weights treated as constants); its compile time is printed;
* ``folded, bf16``: that copy under ``torch.autocast(bfloat16)`` -- ``train.amp: bf16``.

Each variant's largest logit difference from ``as loaded`` (relative to the largest logit) is
printed too. Not part of kdlab: a measurement of what lower teacher cost the hardware allows.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kdlab.distill.teachers import fast_teacher
from kdlab.models import create_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compile", action="store_true", help="also time the folded copy under inductor freezing")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher = create_model("resnet56", num_classes=10, in_channels=3).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    for m in teacher.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(64, 3, 32, 32)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    folded = fast_teacher(teacher, keep=["layer3"], channels_last=True)

    def bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return folded(x_cl)

    variants = {"as loaded": lambda: teacher(x), "folded": lambda: folded(x_cl)}
    if args.compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        compiled = torch.compile(folded)
        t0 = time.perf_counter()
        with torch.inference_mode():
            compiled(x_cl)
        print(f"inductor freezing: first call (compile) {time.perf_counter() - t0:.1f} s")
        variants["folded + inductor freezing"] = lambda: compiled(x_cl)
    variants["folded, bf16"] = bf16
    with torch.inference_mode():
        ref = teacher(x)
        dev = {k: ((f().float() - ref).abs().max() / ref.abs().max()).item() for k, f in variants.items()}
        rates = {k: [] for k in variants}
        for _ in range(args.rounds):
            for k, f in variants.items():
                t0 = time.perf_counter()
                for _ in range(args.batches):
                    f()
                rates[k].append(64 * args.batches / (time.perf_counter() - t0))
    print(f"resnet56 forward, batch 64, {args.threads} thread(s), torch {torch.__version__}")
    base = statistics.median(rates["as loaded"])
    for k in variants:
        med = statistics.median(rates[k])
        print(f"  {k:<28} {med:7.1f} img/s ({med / base:.2f}x)  max |diff| / max |logit| {dev[k]:.1e}  "
              f"rounds {', '.join(f'{r:.0f}' for r in rates[k])}")


if __name__ == "__main__":
    main()
