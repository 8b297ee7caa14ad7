#!/usr/bin/env bash
# Issue 30's GPU part, for a lent device machine: one call, about 6 minutes on an H100 (budget 9).
# The time is an estimate: the script has not yet run on a GPU (no device was lent to the sessions
# that wrote it). `DEVICE=cpu QUICK=1 PY=.venv/bin/python bash bench/gpu_issue30.sh /tmp/g30` runs the
# same commands on the CPU at toy sizes to check the script (PY: a python with kdlab's dependencies).
#
# The device image (Python 3.12; the device tool's KINDS.md lists its packages) has torch, torchvision,
# scipy, matplotlib, scikit-learn and pyyaml but not pydantic; carry it (and torchdistill, optional,
# for part 1b) as wheels. Once, here, in the repo root (pip matches a platform tag exactly, hence
# the list):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
#     -d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
#   python3 -m pip download --no-deps -d .whl torchdistill      # optional: part 1b
# then with the device tool: run(command="bash bench/gpu_issue30.sh", carry=[".whl"], timeout_s=600).
# Everything runs in a new folder $WORK (default: a fresh mktemp -d under /tmp; a given WORK must be
# empty or absent, so a rerun never mixes old results in); only gpu30.log and gpu30-json.tar.gz (the
# bench JSON files) are written to $OUT, which the tool copies back. DEVICE (default cuda) is the
# studies' --device; part 1's step bench uses CUDA whenever torch sees it. The script ends with the
# parts that failed, if any, and exit status 1.
#
# 1a. live KD resnet56 -> resnet20 images/s on the GPU: today's defaults (fp32) vs the fast settings
#     (bf16 + channels-last + folded teacher), alternating in one process, at batch 64 and 256; then
#     the defaults against the fast settings compiled (torch.compile), side by side.
# 1b. the same against torchdistill's DistillationBox (when the wheel came along).
# 2.  `kdlab bench --study` wall time and study/students on the GPU: digits/full (5 methods x 3 seeds)
#     and the CIFAR-shape study of bench/speed_issue30.sh part 2 (1,280 generated images, 2 epochs,
#     seeds 0 1, per-image masks), each in fp32 with fast_teacher and with the fast settings.
# The CPU numbers to set them against are docs/speed.md's (2-core machine).
set -uo pipefail
OUT=${1:-${OUT:-/tmp/kdlab-gpu30}}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
case "$PY" in /*) ;; */*) PY="$PWD/$PY" ;; esac   # part 2a runs in $WORK: a relative path would break there
if [ -n "${WORK:-}" ]; then
  if [ -e "$WORK" ] && [ -n "$(ls -A "$WORK" 2>/dev/null)" ]; then
    echo "gpu_issue30.sh: WORK=$WORK is not empty; give a new folder (old results would be mixed in)" >&2; exit 2
  fi
  mkdir -p "$WORK"
else
  WORK=$(mktemp -d /tmp/kdlab-gpu30-XXXXXX)
fi
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu30.log") 2>&1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
SECONDS=0
FAILED=()
part() { local name=$1; shift; "$@" || { echo "!! part $name failed (exit $?)"; FAILED+=("$name"); }; }
if [ -n "${QUICK:-}" ]; then STEPS=2; REPEATS=2; N=80; EPOCHS=1; else STEPS=20; REPEATS=5; N=1280; EPOCHS=2; fi
echo "== kdlab $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $($PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'), work $WORK, $(date -u)"
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader

echo "== 1a. live KD resnet56 -> resnet20: defaults vs fast settings, alternating"
for B in 64 256; do
  part "1a-b$B" $PY -m kdlab bench --teacher resnet56 --student resnet20 --batch-size $B --steps $STEPS \
    --repeats $REPEATS --variants kd-live-default,kd-live-fast,kd-cached-default --json "$WORK/steps_b$B.json"
done
echo "== 1a'. defaults vs the fast settings compiled (torch.compile; its warm-up is the untimed first step), batch 256"
part "1a-compile" $PY -m kdlab bench --teacher resnet56 --student resnet20 --batch-size 256 --steps $STEPS \
  --repeats $REPEATS --variants kd-live-default,kd-live --amp bf16 --channels-last --compile \
  --json "$WORK/steps_compile.json"
echo "   (part 1a: ${SECONDS}s)"
if $PY -c "import torchdistill, torchvision" 2>/dev/null; then
  echo "== 1b. against torchdistill (its defaults, fp32), batch 64 and 256"
  for B in 64 256; do
    part "1b-b$B" $PY -m kdlab bench --teacher resnet56 --student resnet20 --batch-size $B --steps $STEPS \
      --repeats $REPEATS --against torchdistill --variants kd-live-default,kd-live-fast --json "$WORK/against_b$B.json"
  done
else
  echo "== 1b. skipped: torchdistill (or torchvision) not importable (carry torchdistill's wheel in .whl)"
fi

echo "== 2a. digits/full study (5 methods x 3 seeds), fp32, then the fast settings"
# run from $WORK: the digits teacher is trained first into $WORK/runs/digits-teacher (not timed)
part "2a" bash -c 'cd "$1" && shift && "$@"' _ "$WORK" $PY -m kdlab bench --study digits/full --device "$DEVICE" \
  ${QUICK:+--seeds 0 --set train.epochs=2} --out digits
part "2a-fast" bash -c 'cd "$1" && shift && "$@"' _ "$WORK" $PY -m kdlab bench --study digits/full --device "$DEVICE" \
  ${QUICK:+--seeds 0 --set train.epochs=2} --set train.amp=bf16 --set train.channels_last=true \
  --set train.fast_teacher=true --out digits-fast
STUDY=(cifar10/full --seeds 0 1 --set train.epochs=$EPOCHS --set train.fast_teacher=true
       --set student.model=resnet20 --set teacher.model=resnet56 --set 'teacher.kwargs={}'
       --mask-reuse per-image --device "$DEVICE")
echo "== 2b. CIFAR-shape study ($N generated images, $EPOCHS epochs, seeds 0 1, per-image masks), fp32 + fast_teacher"
part "2b" $PY -m kdlab bench --study "${STUDY[@]}" --synthetic-cifar "$N" --teacher-set student.model=resnet56 \
  --teacher-set 'student.kwargs={}' --teacher-set train.epochs=3 --out "$WORK/cifar"
echo "== 2c. the same with the fast settings"
part "2c" $PY -m kdlab bench --study "${STUDY[@]}" --set train.amp=bf16 --set train.channels_last=true \
  --data-dir "$WORK/cifar/data" --set "teacher.checkpoint=$WORK/cifar/teacher/best.pt" --out "$WORK/cifar-fast"
for f in digits digits-fast cifar cifar-fast; do
  [ -f "$WORK/$f/bench-study.json" ] && cp "$WORK/$f/bench-study.json" "$WORK/study_$f.json"
done
(cd "$WORK" && ls *.json >/dev/null 2>&1 && tar -czf "$OUT/gpu30-json.tar.gz" *.json)
echo "== done in ${SECONDS}s (work folder $WORK)"
if [ ${#FAILED[@]} -gt 0 ]; then echo "== FAILED parts: ${FAILED[*]}"; exit 1; fi
