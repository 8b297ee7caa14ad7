#!/usr/bin/env bash
# Issue 30 measurements, to run on an IDLE machine (nothing else on the cores), from the repo root:
#
#   bash bench/speed_issue30.sh [OUT]          # OUT: scratch folder (default /tmp/kdlab-speed30)
#
# Environment: PY (python with kdlab's deps; default .venv/bin/python), TD_PY (a python that
# imports torchdistill and torchvision, optional: without it the torchdistill rows are skipped),
# THREADS (torch threads, default 2), REPEATS (rounds per side-by-side bench, default 5),
# STEPS (batches per round, default 5), PARTS (default "1 2 3").
# Budget: about 10 minutes on 2 idle cores (part 1 ~2-3 min, part 2 ~1 min with TD_PY, part 3 ~5-6 min).
#
# 1. kdlab before/after, live KD resnet56 -> resnet20, batch 64, generated CIFAR-shape data:
#    `kd-live-asloaded` is the option off (train.fast_teacher=false: the teacher as loaded),
#    `kd-live` the defaults (teacher BatchNorm folded). The variants take turns in one process,
#    REPEATS rounds of 5 steps each; every round's images/s is printed, not only the median.
# 2. (with TD_PY) the same step against torchdistill: `kdlab bench --against torchdistill`
#    runs kdlab (defaults) and torchdistill's DistillationBox alternately on the same data.
# 3. `kdlab bench --study cifar10/full` at CIFAR shape: 1,280 generated images, 2 epochs, seeds
#    0 1, mask.reuse per-image; ends with the `study/students` line.
set -euo pipefail
OUT=${1:-/tmp/kdlab-speed30}
PY=${PY:-.venv/bin/python}
THREADS=${THREADS:-2}
REPEATS=${REPEATS:-5}
STEPS=${STEPS:-5}
PARTS=${PARTS:-"1 2 3"}   # which parts to run (a quick check: PARTS=1 STEPS=1 REPEATS=1)
export OMP_NUM_THREADS=$THREADS PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
echo "== kdlab $(git rev-parse --short HEAD), torch $($PY -c 'import torch; print(torch.__version__)'), threads $THREADS, $(date -u)"

if [[ " $PARTS " == *" 1 "* ]]; then
echo "== 1. live KD resnet56 -> resnet20, batch 64: before (asloaded) vs after (defaults), alternating"
$PY -m kdlab bench --teacher resnet56 --student resnet20 --batch-size 64 --steps "$STEPS" --repeats "$REPEATS" \
  --threads "$THREADS" --variants kd-live-asloaded,kd-live --json "$OUT/before_after.json"
echo "== 1b. the same with --channels-last (student and teacher; not a default on the CPU)"
$PY -m kdlab bench --teacher resnet56 --student resnet20 --batch-size 64 --steps "$STEPS" --repeats "$REPEATS" \
  --threads "$THREADS" --variants kd-live-asloaded,kd-live --channels-last --json "$OUT/before_after_cl.json"
fi

if [[ " $PARTS " != *" 2 "* ]]; then
  :
elif [ -n "${TD_PY:-}" ] && $TD_PY -c "import torchdistill, torchvision" 2>/dev/null; then
  echo "== 2. against torchdistill (same data, same torch in $TD_PY)"
  $TD_PY -m kdlab bench --teacher resnet56 --student resnet20 --batch-size 64 --steps "$STEPS" \
    --repeats "$REPEATS" --threads "$THREADS" --against torchdistill --json "$OUT/against_torchdistill.json"
else
  echo "== 2. skipped: set TD_PY to a python with torchdistill and torchvision (see docs/speed.md)"
fi

[[ " $PARTS " == *" 3 "* ]] || exit 0
echo "== 3. study at CIFAR shape: cifar10/full, resnet56 -> resnet20, 1,280 images, 2 epochs, seeds 0 1, per-image masks"
$PY -m kdlab bench --study cifar10/full --synthetic-cifar 1280 --seeds 0 1 --set train.epochs=2 --set train.fast_teacher=true \
  --set student.model=resnet20 --set teacher.model=resnet56 --set 'teacher.kwargs={}' \
  --teacher-set student.model=resnet56 --teacher-set 'student.kwargs={}' --teacher-set train.epochs=3 \
  --mask-reuse per-image --device cpu --out "$OUT/study"
