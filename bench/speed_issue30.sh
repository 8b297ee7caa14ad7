#!/usr/bin/env bash
# Issue 30 measurements, to run on an IDLE machine (nothing else on the cores), from the repo root:
#
#   TD_PY=<python with torchdistill> bash bench/speed_issue30.sh [OUT]    # OUT: scratch (default /tmp/kdlab-speed30)
#
# BUDGET: at most 12 minutes on 2 idle cores (about 8): part 1 ~1.5 min, part 2 ~3 min, part 3 ~4 min.
#
# Environment: PY (python with kdlab's deps; default .venv/bin/python), TD_PY (a python that
# imports torchdistill and torchvision, optional: without it part 1 times kdlab's two settings
# only), THREADS (torch threads, default 2), REPEATS (rounds per side-by-side bench, default 7),
# STEPS (batches per round, default 10), PARTS (default "1 2 3"), STUDY_N (generated training
# images of part 2, default 1280), ACC_N (part 3 on that many generated CIFAR-format images
# instead of mnist5k). A quick check that everything runs (not a measurement):
# STEPS=1 REPEATS=1 STUDY_N=40 ACC_N=40 bash bench/speed_issue30.sh /tmp/s30-check
#
# "default" = today's recipe defaults (fp32, contiguous memory, train.fast_teacher false);
# "fast"    = train.amp bf16 + train.channels_last + train.fast_teacher (opt-in: bf16 is not exact).
#
# 1. live KD resnet56 -> resnet20, batch 64, generated CIFAR-shape data, every round printed:
#    (with TD_PY) kdlab default, kdlab fast and torchdistill's DistillationBox (its own defaults,
#    fp32) take turns in one process on TD_PY's torch, with each kdlab setting's ratio over
#    torchdistill; then (always) kdlab default vs fast on PY's torch.
# 2. `kdlab bench --study cifar10/full` at CIFAR shape (1,280 generated images, 2 epochs, seeds
#    0 1, mask.reuse per-image): (a) fast_teacher on, fp32 (as measured before), (b) the fast
#    settings; each ends with its `study/students` line, after the wall time split into students,
#    teacher forward, masks, evaluation, runs' set-up, checkpoints, report and other.
# 3. accuracy after 3 epochs: live KD resnet56 -> resnet20 on mnist5k (3,600 real training digits,
#    1,000 test; the generated CIFAR-format data is not learnable by a ResNet-56 in 3 epochs),
#    default vs fast, seeds 0 1 2 (alternating), test accuracy per seed and the paired difference's
#    95% t-interval (`kdlab bench --accuracy`; teacher: 3 epochs, trained first).
set -euo pipefail
OUT=${1:-/tmp/kdlab-speed30}
PY=${PY:-.venv/bin/python}
THREADS=${THREADS:-2}
REPEATS=${REPEATS:-7}
STEPS=${STEPS:-10}
PARTS=${PARTS:-"1 2 3"}
STUDY_N=${STUDY_N:-1280}
ACC_N=${ACC_N:-}
export OMP_NUM_THREADS=$THREADS PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"
echo "== kdlab $(git rev-parse --short HEAD), torch $($PY -c 'import torch; print(torch.__version__)'), threads $THREADS, $(date -u)"
SECONDS=0
STEP=(--teacher resnet56 --student resnet20 --batch-size 64 --steps "$STEPS" --repeats "$REPEATS" --threads "$THREADS")

if [[ " $PARTS " == *" 1 "* ]]; then
  if [ -n "${TD_PY:-}" ] && $TD_PY -c "import torchdistill, torchvision" 2>/dev/null; then
    echo "== 1a. kdlab default vs kdlab fast vs torchdistill, alternating (torch of $TD_PY)"
    $TD_PY -m kdlab bench "${STEP[@]}" --against torchdistill --variants kd-live-default,kd-live-fast \
      --json "$OUT/against_torchdistill.json"
  else
    echo "== 1a. skipped: set TD_PY to a python with torchdistill and torchvision (see docs/speed.md)"
  fi
  echo "== 1b. kdlab default vs fast, alternating (torch of $PY)"
  $PY -m kdlab bench "${STEP[@]}" --variants kd-live-default,kd-live-fast --json "$OUT/default_fast.json"
  echo "   (part 1: ${SECONDS}s)"
fi

if [[ " $PARTS " == *" 2 "* ]]; then
  STUDY=(cifar10/full --seeds 0 1 --set train.epochs=2 --set train.fast_teacher=true
         --set student.model=resnet20 --set teacher.model=resnet56 --set 'teacher.kwargs={}'
         --mask-reuse per-image --device cpu --threads "$THREADS")
  echo "== 2a. study at CIFAR shape: cifar10/full, resnet56 -> resnet20, 1,280 images, 2 epochs, seeds 0 1, per-image masks, fast_teacher, fp32"
  $PY -m kdlab bench --study "${STUDY[@]}" --synthetic-cifar "$STUDY_N" \
    --teacher-set student.model=resnet56 --teacher-set 'student.kwargs={}' --teacher-set train.epochs=3 \
    --out "$OUT/study"
  echo "== 2b. the same study with the fast settings (bf16 + channels-last + fast_teacher)"
  $PY -m kdlab bench --study "${STUDY[@]}" --set train.amp=bf16 --set train.channels_last=true \
    --data-dir "$OUT/study/data" --set "teacher.checkpoint=$OUT/study/teacher/best.pt" --out "$OUT/study-fast"
  echo "   (parts so far: ${SECONDS}s)"
fi

if [[ " $PARTS " == *" 3 "* ]]; then
  echo "== 3. accuracy after 3 epochs, default vs fast, seeds 0 1 2"
  $PY -m kdlab bench --accuracy --teacher resnet56 --student resnet20 --epochs 3 ${ACC_N:+--synthetic-cifar "$ACC_N"} \
    --seeds 0 1 2 --threads "$THREADS" --out "$OUT/accuracy"
fi
echo "== done in ${SECONDS}s (budget 720 s)"
