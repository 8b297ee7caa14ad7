"""Bad-input cases of kdlab's shipped command families, one line each (see ``bad_case.py``).

Issue 23's items are marked ``# 23.<section>``; each fails on the kdlab before that issue and passes
now. Most cases are refused while the arguments or the recipe are checked, before any training.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from bad_case import C

SR, TR = "{b}/student.yaml", "{b}/teacher.yaml"
CK, TCK = "{b}/student/best.pt", "{b}/teacher/best.pt"
LMCK, LMR = "{lm}/byte/teacher/best.pt", "{lm}/lm.yaml"
D = "--quiet"


# ------------------------------------------------------------------------------------- file makers
def png_bytes(w: int, h: int, idat: bytes = b"") -> bytes:
    """A PNG whose header claims ``w`` x ``h`` grey pixels; ``idat``: the compressed rows (none: a
    header-only file, enough for Pillow's size check)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + (chunk(b"IDAT", idat) if idat else b"") + chunk(b"IEND", b"")


def small_png(w: int = 8, h: int = 8, value: int = 128) -> bytes:
    return png_bytes(w, h, zlib.compress(b"".join(b"\x00" + bytes([value]) * w for _ in range(h))))


def image_folder(extra: dict | None = None, per_class: int = 6) -> dict:
    """``imgs/<a|b>/<i>.png`` (8x8 grey) plus ``extra`` files, as a ``files`` mapping."""
    files = {f"imgs/{c}/{i}.png": small_png(value=40 * i + (0 if c == "a" else 20))
             for c in "ab" for i in range(per_class)}
    files.update(extra or {})
    return files


def torch_file(obj_fn):
    """A ``files`` value writing ``torch.save(obj_fn(bases))``."""
    def write(path: Path, bases: dict) -> None:
        import torch

        torch.save(obj_fn(bases), path)
    return write


def copy_of(src: str, edit=None):
    """A ``files`` value copying ``src`` (formatted with the bases; a file through ``edit(bytes)``,
    or a whole folder)."""
    def write(path: Path, bases) -> None:
        import shutil

        source = Path(src.format_map(bases))
        if source.is_dir():
            shutil.copytree(source, path, dirs_exist_ok=True)
            return
        data = source.read_bytes()
        path.write_bytes(edit(data) if edit else data)
    return write


def imagefolder_set(root: str = "{t}/imgs", size: str = "[8, 8]") -> str:
    """Overrides reading an image folder with a CE-only recipe (no teacher of other classes)."""
    return (f"--set data.name=imagefolder --set data.root={root} --set 'data.image_size={size}' "
            f"--set teacher=null --set 'loss=[{{{{term: ce}}}}]' --set data.label_fraction=1.0")


IMGF = imagefolder_set()

CASES = [
    # -------------------------------------------------------------------------------- distill / recipe
    C("distill", "--out empty (it fell back to the default folder)", f"distill {SR} --out ''", "--out"),
    C("ablate", "--out empty", f"ablate {SR} --out ''", "--out"),
    C("distill", "--set loss[0].weight (list entry) out of range", f"distill {SR} --set loss[9].weight=1 {D}", "loss has 2 entries"),
    C("distill", "--set loss.<term> not in the recipe", f"distill {SR} --set loss.nosuch.weight=1 {D}", "'nosuch' is not in it"),
    C("distill", "--set loss[0] on a section", f"distill {SR} --set train[0]=1 {D}", "train is not a list"),
    C("distill", "--set indexes a list the file lacks", f"distill {SR} --set mask[0].q=1 {D}", "mask"),
    C("distill", "all loss weights 0 (--set list entries)", f"distill {SR} --set loss[0].weight=0 --set loss[1].weight=0 {D}", "weight 0"),  # 23.4
    C("distill", "all loss weights 0 (whole list)", f"distill {SR} --set 'loss=[{{{{term: ce, weight: 0}}}}, {{{{term: kd, weight: 0}}}}]' {D}", "weight 0"),  # 23.4
    C("distill", "NaN KD temperature", f"distill {SR} --set loss.kd.T=.nan {D}", "loss[1].T"),  # 23.5
    C("distill", "infinite KD temperature", f"distill {SR} --set loss[1].T=.inf {D}", "finite"),
    C("distill", "NaN loss weight", f"distill {SR} --set loss[0].weight=.nan {D}", "loss[0].weight"),
    C("distill", "infinite learning rate", f"distill {SR} --set train.lr=.inf {D}", "train.lr"),
    C("distill", "NaN momentum", f"distill {SR} --set train.momentum=.nan {D}", "train.momentum"),
    C("distill", "data.val_fraction 0.9999 leaves no training images", f"distill {SR} --set data.val_fraction=0.9999 {D}", "data.val_fraction"),  # 23.4
    C("distill", "data.label_fraction 0", f"distill {SR} --set data.label_fraction=0 {D}", "label_fraction"),
    C("distill", "data.augment.crop_pad -1", f"distill {SR} --set data.augment.crop_pad=-1 {D}", "crop_pad"),
    C("distill", "train.epochs -1", f"distill {SR} --set train.epochs=-1 {D}", "train.epochs"),
    C("distill", "train.grad_clip 0", f"distill {SR} --set train.grad_clip=0 {D}", "grad_clip"),
    C("distill", "train.warmup_epochs -1", f"distill {SR} --set train.warmup_epochs=-1 {D}", "warmup_epochs"),
    C("distill", "train.momentum 1", f"distill {SR} --set train.momentum=1 {D}", "momentum"),
    C("distill", "train.betas of one number", f"distill {SR} --set train.betas=[0.9] {D}", "betas"),
    C("distill", "train.log_to wandb", f"distill {SR} --set train.log_to=[wandb] {D}", "log_to"),
    C("distill", "train.gamma 2", f"distill {SR} --set train.gamma=2 {D}", "gamma"),
    C("distill", "data.augment.randaugment -1", f"distill {SR} --set data.augment.randaugment=-1 {D}", "randaugment"),
    C("distill", "data.augment.magnitude 0", f"distill {SR} --set data.augment.magnitude=0 {D}", "magnitude"),
    C("distill", "train.mixup -1", f"distill {SR} --set train.mixup=-1 {D}", "mixup"),
    C("distill", "train.ema 1", f"distill {SR} --set train.ema=1 {D}", "train.ema"),
    C("distill", "teacher.epochs 0", f"distill {SR} --set teacher.epochs=0 {D}", "teacher.epochs"),
    C("distill", "train.eval_batch_size 0", f"distill {SR} --set train.eval_batch_size=0 {D}", "eval_batch_size"),
    C("distill", "mask.steps 0", f"distill {SR} --set mask.steps=0 {D}", "mask.steps"),
    C("distill", "student.input.resize [0, 0]", f"distill {SR} --set 'student.input.resize=[0, 0]' {D}", "resize"),
    C("distill", "student model module:function not importable", f"distill {SR} --set student.model=nosuchmod:make {D}", "nosuchmod"),
    C("distill", "student weights file missing", f"distill {SR} --set student.weights={{t}}/none.pt {D}", "none.pt"),
    C("distill", "data.root is a file", f"distill {SR} {imagefolder_set('{b}/student.yaml')} {D}", "is a file"),  # 23.5
    C("distill", "data.root missing", f"distill {SR} {imagefolder_set('{t}/nowhere')} {D}", "nowhere"),
    C("distill", "imagefolder without image_size", f"distill {SR} --set data.name=imagefolder --set data.root={{t}}/imgs --set teacher=null --set 'loss=[{{{{term: ce}}}}]' {D}", "image_size", image_folder()),
    C("distill", "imagefolder without class folders", f"distill {SR} {IMGF} {D}", "class folders", {"imgs/readme.txt": "x"}),
    C("distill", "imagefolder class folders without images", f"distill {SR} {IMGF} {D}", "no images", {"imgs/a/x.txt": "x"}),
    C("distill", "decompression-bomb PNG in the image folder", f"distill {SR} {IMGF} {D}", "imgs/a/bomb.png",
      image_folder({"imgs/a/bomb.png": png_bytes(40000, 40000)})),  # 23.4
    C("distill", "garbage PNG in the image folder", f"distill {SR} {IMGF} {D}", "imgs/b/bad.png",
      image_folder({"imgs/b/bad.png": b"\x89PNG\r\n\x1a\nnot really"})),
    C("distill", "empty PNG in the image folder", f"distill {SR} {IMGF} {D}", "imgs/b/empty.png",
      image_folder({"imgs/b/empty.png": b""})),
    C("distill", "image folder train/ without test/", f"distill {SR} {IMGF} {D}", "test/",
      {f"imgs/train/{c}/{i}.png": small_png() for c in "ab" for i in range(3)}),
    C("distill", "teacher checkpoint whose model entry is a list", f"distill {SR} --set teacher.checkpoint={{t}}/t.pt {D}", "not a state dict",
      {"t.pt": torch_file(lambda b: {"model": [1, 2, 3], "model_name": "cnn_tiny", "num_classes": 10, "in_channels": 1})}),  # 23.4
    C("distill", "teacher checkpoint is a language model", f"distill {SR} --set teacher.checkpoint={LMCK} {D}", "language model"),
    C("distill", "teacher checkpoint lacks model_name", f"distill {SR} --set teacher.checkpoint={{t}}/t.pt {D}", "model_name",
      {"t.pt": torch_file(lambda b: {"model": {}, "num_classes": 10, "in_channels": 1})}),
    C("distill", "--seed -1", f"distill {SR} --seed -1 {D}", "--seed"),
    C("distill", "--device tpu", f"distill {SR} --device tpu {D}", "--device"),
    C("distill", "--set below a list value", f"distill {SR} --set train.log_to.x=1 {D}", "train.log_to"),
    C("distill", "unknown option", f"distill {SR} --epochs 3 {D}", "kdlab distill --help"),
    # -------------------------------------------------------------------------------------- train-teacher
    C("train-teacher", "recipe not found", f"train-teacher {{t}}/none.yaml {D}", "none.yaml"),
    C("train-teacher", "train.epochs 0", f"train-teacher {TR} --set train.epochs=0 {D}", "train.epochs"),
    C("train-teacher", "data.val_fraction 0.9999", f"train-teacher {TR} --set data.val_fraction=0.9999 {D}", "val_fraction"),
    C("train-teacher", "unknown model", f"train-teacher {TR} --set student.model=nosuch {D}", "nosuch"),
    C("train-teacher", "--device cuda:x", f"train-teacher {TR} --device cuda:x {D}", "--device"),
    C("train-teacher", "all loss weights 0", f"train-teacher {TR} --set 'loss=[{{{{term: ce, weight: 0}}}}]' {D}", "weight 0"),
    C("train-teacher", "--set indexes the default loss list", f"train-teacher {TR} --set loss[0].weight=0 {D}", "sets no list 'loss'"),
    C("train-teacher", "--out below a file", f"train-teacher {TR} --out {{t}}/f/run {D}", "below the file", {"f": "keep"}),
    C("train-teacher", "imagefolder data.root is a file", f"train-teacher {TR} {imagefolder_set('{b}/teacher.yaml')} {D}", "is a file"),
    C("train-teacher", "--restart with a value", f"train-teacher {TR} --restart yes {D}", "unrecognized"),
    # ------------------------------------------------------------------------------------------- ablate
    C("ablate", "--seeds range backwards", f"ablate {SR} --seeds 3-1 {D}", "backwards"),
    C("ablate", "--seeds repeated", f"ablate {SR} --seeds 0 0 {D}", "twice"),
    C("ablate", "--n-seeds 0", f"ablate {SR} --n-seeds 0 {D}", "--n-seeds"),
    C("ablate", "--seeds and --n-seeds", f"ablate {SR} --seeds 0 --n-seeds 2 {D}", "not allowed"),
    C("ablate", "--jobs 0", f"ablate {SR} --jobs 0 {D}", "--jobs"),
    C("ablate", "--threads 0", f"ablate {SR} --threads 0 {D}", "--threads"),
    C("ablate", "--launcher slurm", f"ablate {SR} --launcher slurm {D}", "--launcher"),
    C("ablate", "--launcher-opt without =", f"ablate {SR} --launcher-opt timeout {D} --out {{t}}/o", "--launcher-opt"),
    C("ablate", "--mode misspelt", f"ablate {SR} --mode lader {D}", "did you mean 'ladder'"),
    C("ablate", "all loss weights 0", f"ablate {SR} --set loss[0].weight=0 --set loss[1].weight=0 --out {{t}}/o {D}", "weight 0"),
    C("ablate", "NaN temperature", f"ablate {SR} --set loss.kd.T=.nan --out {{t}}/o {D}", "finite"),
    C("ablate", "recipe not found", f"ablate {{t}}/none.yaml {D}", "none.yaml"),
    # -------------------------------------------------------------------------------------------- demo
    C("demo", "--seeds text", f"demo --seeds x {D}", "'x' is not a seed"),
    C("demo", "--set train.epochs=0", f"demo --set train.epochs=0 --out {{t}}/o {D}", "train.epochs"),
    C("demo", "--device tpu", f"demo --device tpu {D}", "--device"),
    C("demo", "--set a list entry out of range", f"demo --set loss[7].weight=1 --out {{t}}/o {D}", "loss has"),
    # ------------------------------------------------------------------------------------------- sweep
    C("sweep", "--students unknown model", f"sweep {SR} --students nosuch", "--students: unknown model 'nosuch'", quiet=True),
    C("sweep", "--alphas 2", f"sweep {SR} --alphas 2 {D}", "--alphas"),
    C("sweep", "--alphas nan", f"sweep {SR} --alphas nan {D}", "--alphas"),
    C("sweep", "--grid 0 4", f"sweep {SR} --grid 0 4 {D}", "--grid"),
    C("sweep", "--k 0", f"sweep {SR} --k 0 {D}", "--k"),
    C("sweep", "--n-images 0", f"sweep {SR} --n-images 0 {D}", "--n-images"),
    C("sweep", "--steps 0", f"sweep {SR} --steps 0 {D}", "--steps"),
    C("sweep", "--method lime", f"sweep {SR} --method lime {D}", "--method"),
    C("sweep", "--jobs 0", f"sweep {SR} --jobs 0 {D}", "--jobs"),
    C("sweep", "recipe with all weights 0", f"sweep {SR} --set loss[0].weight=0 --set loss[1].weight=0 --out {{t}}/o {D}", "weight 0"),
    # ----------------------------------------------------------------------------------------- compare
    C("compare", "--all unknown data set", f"compare --all nosuch --out {{t}}/o {D}", "nosuch"),
    C("compare", "recipe not found", f"compare {{t}}/none.yaml --out {{t}}/o {D}", "none.yaml"),
    C("compare", "--jobs 0", f"compare --all digits --jobs 0 {D}", "--jobs"),
    C("compare", "--seeds text", f"compare --all digits --seeds a {D}", "'a' is not a seed"),
    C("compare", "--set NaN temperature", f"compare {SR} --set loss.kd.T=.nan --out {{t}}/o {D}", "finite"),
    # ---------------------------------------------------------------------------------------- paradigm
    C("paradigm", "unknown paradigm", f"paradigm nosuch {SR} {D}", "nosuch"),
    C("paradigm", "paradigm without its recipe", f"paradigm ban {D}", "recipe"),
    C("paradigm", "paradigm.generations 0", f"paradigm ban {SR} --set paradigm.generations=0 {D}", "generations"),
    C("paradigm", "unknown paradigm setting", f"paradigm ban {SR} --set paradigm.nosuch=1 {D}", "nosuch"),
    C("paradigm", "paradigm recipe not found", f"paradigm paradigms/digits/nosuch {D}", "nosuch"),
    C("paradigm", "--seed -1", f"paradigm ban {SR} --seed -1 {D}", "--seed"),
    C("paradigm", "all loss weights 0", f"paradigm ban {SR} --set loss[0].weight=0 --set loss[1].weight=0 {D}", "weight 0"),
    # ---------------------------------------------------------------------------------------- evaluate
    C("evaluate", "--dataset imagefolder without --image-size", f"evaluate {CK} --dataset imagefolder --data-dir {{t}}/imgs", "--image-size", image_folder()),  # 23.4
    C("evaluate", "--dataset imagefolder without --data-dir", f"evaluate {CK} --dataset imagefolder --image-size 8 8", "--data-dir"),
    C("evaluate", "--image-size 0 8", f"evaluate {CK} --dataset imagefolder --image-size 0 8", "--image-size"),
    C("evaluate", "unknown --dataset", f"evaluate {CK} --dataset nosuch", "nosuch"),
    C("evaluate", "--dataset factory not importable", f"evaluate {CK} --dataset nosuchmod:data", "nosuchmod"),
    C("evaluate", "checkpoint whose model entry is not a dict", f"evaluate {{b}}/notdict.pt", "not a state dict"),  # 23.4
    C("evaluate", "language-model checkpoint", f"evaluate {LMCK}", "language model"),  # 23.5
    C("evaluate", "5-class checkpoint on digits", f"evaluate {{b}}/five.pt --dataset digits", "predicts 5 classes"),
    C("evaluate", "empty checkpoint file", f"evaluate {{t}}/e.pt", "e.pt", {"e.pt": b""}),
    C("evaluate", "--device tpu", f"evaluate {CK} --device tpu", "--device"),
    C("evaluate", "imagefolder with a bomb PNG", f"evaluate {CK} --dataset imagefolder --data-dir {{t}}/imgs --image-size 8 8", "bomb.png",
      image_folder({"imgs/a/bomb.png": png_bytes(40000, 40000)})),
    C("evaluate", "imagefolder --data-dir is a file", f"evaluate {CK} --dataset imagefolder --data-dir {SR} --image-size 8 8", "is a file"),
    C("evaluate", "unknown option (hint names evaluate)", f"evaluate {CK} --out {{t}}/o", "kdlab evaluate --help"),
    # ----------------------------------------------------------------------------------------- explain
    C("explain", "teacher checkpoint missing", f"explain --teacher {{t}}/none.pt --student {CK} --out {{t}}/o", "none.pt"),
    C("explain", "no --student", f"explain --teacher {TCK}", "--student"),
    C("explain", "--alpha 2", f"explain --teacher {TCK} --student {CK} --alpha 2", "--alpha"),
    C("explain", "--k 0", f"explain --teacher {TCK} --student {CK} --k 0", "--k"),
    C("explain", "--grid 0 0", f"explain --teacher {TCK} --student {CK} --grid 0 0", "--grid"),
    C("explain", "--n-images 0", f"explain --teacher {TCK} --student {CK} --n-images 0", "--n-images"),
    C("explain", "--T 0", f"explain --teacher {TCK} --student {CK} --T 0", "--T"),
    C("explain", "--steps 0", f"explain --teacher {TCK} --student {CK} --steps 0", "--steps"),
    C("explain", "--batch-size 0", f"explain --teacher {TCK} --student {CK} --batch-size 0", "--batch-size"),
    C("explain", "--superpixels 1", f"explain --teacher {TCK} --student {CK} --superpixels 1", "--superpixels"),
    C("explain", "--n-overlay -1", f"explain --teacher {TCK} --student {CK} --n-overlay -1", "--n-overlay"),
    C("explain", "--seed -1", f"explain --teacher {TCK} --student {CK} --seed -1", "--seed"),
    C("explain", "--method lime", f"explain --teacher {TCK} --student {CK} --method lime", "--method"),
    C("explain", "language-model teacher", f"explain --teacher {LMCK} --student {CK} --out {{t}}/o", "language model"),
    C("explain", "student whose model entry is not a dict", f"explain --teacher {TCK} --student {{b}}/notdict.pt --out {{t}}/o", "not a state dict"),
    C("explain", "5-class student with a 10-class teacher", f"explain --teacher {TCK} --student {{b}}/five.pt --out {{t}}/o --n-images 8", "5"),
    C("explain", "--out is a file", f"explain --teacher {TCK} --student {CK} --out {{t}}/f --n-images 8", "f", {"f": "keep"}),
    C("explain", "--layer-teacher without --method gradcam", f"explain --teacher {TCK} --student {CK} --layer-teacher stage2 --n-images 4",
      "applies to --method gradcam only", quiet=True),
    C("explain", "--layer-teacher the teacher lacks", f"explain --teacher {TCK} --student {CK} --method gradcam --layer-teacher nosuch --n-images 4",
      "--layer-teacher: model has no layer 'nosuch'", quiet=True),
    C("explain", "--layer-student the student lacks", f"explain --teacher {TCK} --student {CK} --method gradcam --layer-student nosuch --n-images 4",
      "--layer-student: model has no layer 'nosuch'", quiet=True),
    C("explain", "--target past the classes", f"explain --teacher {TCK} --student {CK} --target 10 --n-images 4", "--target 10", quiet=True),
    C("explain", "--target negative", f"explain --teacher {TCK} --student {CK} --target -1 --n-images 4", "--target -1", quiet=True),
    C("explain", "--target unknown word", f"explain --teacher {TCK} --student {CK} --target foo --n-images 4", "--target foo", quiet=True),
    C("explain", "corrupt teacher: no runs/explain folder made", f"explain --teacher {{t}}/t.pt --student {CK}", "t.pt",
      {"t.pt": bytes(range(256)) * 8}, quiet=True),
    # ----------------------------------------------------------------------------------- explain-study
    C("explain-study", "study folder missing", f"explain-study {{t}}/none", "none"),
    C("explain-study", "--n-images 0", "explain-study {study} --n-images 0", "--n-images"),
    C("explain-study", "--k 0", "explain-study {study} --k 0", "--k"),
    C("explain-study", "--grid 0 1", "explain-study {study} --grid 0 1", "--grid"),
    C("explain-study", "--steps 0", "explain-study {study} --steps 0", "--steps"),
    C("explain-study", "--teacher missing", "explain-study {study} --teacher {t}/none.pt", "none.pt"),
    C("explain-study", "study folder is a file", f"explain-study {SR}", "student.yaml"),
    C("explain-study", "study table truncated", "explain-study {t}/s", "table.json", {"s": copy_of("{study}"), "s/report/table.json": b'{"methods": ['}),
    # ---------------------------------------------------------------------------------------- findings
    C("findings", "study folder missing", f"findings {{t}}/none --out {{t}}/o", "none"),
    C("findings", "one `kdlab distill` run folder", "findings {b}/student --out {t}/o", "is one run, not a study"),
    C("findings", "study without a table", f"findings {{t}}/s --out {{t}}/o", "table.json", {"s/x.txt": "x"}),
    C("findings", "study table truncated", "findings {t}/s --out {t}/o", "table.json", {"s": copy_of("{study}"), "s/report/table.json": b'{"meth'}),
    C("findings", "study table of another shape", "findings {t}/s --out {t}/o", "methods", {"s": copy_of("{study}"), "s/report/table.json": b'[1, 2]'}),
    C("findings", "--out is a file", "findings {study} --out {t}/f", "f", {"f": "keep"}),
    # ------------------------------------------------------------------------------------------ report
    C("report", "study folder missing", "report {t}/none", "none does not exist"),
    C("report", "the folder above the study (bench --study's --out)", "report {t}/b", "a study in",
      {"b/study": copy_of("{study}")}),
    C("report", "a file for the study folder", f"report {SR}", "student.yaml is a file"),
    C("report", "one `kdlab distill` run folder", "report {b}/student", "student/result.json; `kdlab evaluate "),
    C("report", "one LM teacher run folder", "report {lm}/byte/teacher", "teacher/result.json; `kdlab lm generate "),
    C("report", "one `kdlab lm distill` output folder", "report {t}/o", "o holds one run (distill/seed0), not a study",
      {"o/distill/seed0": copy_of("{lm}/byte/teacher"), "o/tokenizer.json": copy_of("{lm}/byte/tokenizer.json")}),
    C("report", "one method's folder of a study", "report {study}/kd --no-figures", "kd holds one method's runs (seed0), not a study; give the study folder above it: `kdlab report "),
    C("report", "empty folder", "report {t}/s", "result.json", {"s/x.txt": "x"}),
    C("report", "study table truncated", "report {t}/s --no-figures", "table.json", {"s": copy_of("{study}"), "s/report/table.json": b'{"methods": [{'}),
    C("report", "a run's result.json truncated", "report {t}/s --no-figures", "result.json",
      {"s": copy_of("{study}"), "s/kd/seed0/result.json": b'{"method": "kd", "se'}),
    C("report", "a run's result.json without test_acc", "report {t}/s --no-figures", "test_acc",
      {"s": copy_of("{study}"), "s/kd/seed0/result.json": b'{"method": "kd", "seed": 0}'}),
    C("report", "a run's test_acc not a number", "report {t}/s --no-figures", "test_acc is 'high', not a number",
      {"s": copy_of("{study}"), "s/kd/seed0/result.json": b'{"method": "kd", "seed": 0, "test_acc": "high"}'}),
    C("report", "--baseline not in the study", "report {study} --baseline nosuch --no-figures", "nosuch"),
    # -------------------------------------------------------------------------------------- robustness
    C("robustness", "no checkpoint and no study", "robustness", "--study"),
    C("robustness", "--study on one `kdlab distill` run folder", "robustness --study {b}/student", "without --study"),
    C("robustness", "--study with checkpoints", f"robustness {CK} --study {{study}}", "--study"),
    C("robustness", "--severities 0", f"robustness {CK} --severities 0", "--severities"),
    C("robustness", "--severities 6", f"robustness {CK} --severities 6", "--severities"),
    C("robustness", "unknown corruption", f"robustness {CK} --corruptions nosuch --out {{t}}/o", "nosuch"),
    C("robustness", "--limit 0", f"robustness {CK} --limit 0", "--limit"),
    C("robustness", "--batch-size 0", f"robustness {CK} --batch-size 0", "--batch-size"),
    C("robustness", "--names count differs", f"robustness {CK} --names a b --out {{t}}/o --limit 8", "--names"),
    C("robustness", "--reference not a name", f"robustness {CK} --names a --reference nosuch --out {{t}}/o --limit 8", "nosuch"),
    C("robustness", "--cifar-c on a digits model", f"robustness {CK} --cifar-c {{t}}/none --out {{t}}/o --limit 8", "--cifar-c"),
    C("robustness", "checkpoint missing", f"robustness {{t}}/none.pt --out {{t}}/o", "none.pt"),
    C("robustness", "language-model checkpoint", f"robustness {LMCK} --out {{t}}/o --limit 8", "language model"),
    C("robustness", "--study folder missing", "robustness --study {t}/none", "none"),
    C("robustness", "--study table truncated", "robustness --study {t}/s --limit 8", "table.json",
      {"s": copy_of("{study}"), "s/report/table.json": b'{"methods": [{"method": '}),
    # ----------------------------------------------------------------------------------------- profile
    C("profile", "empty .onnx", "profile {t}/m.onnx --out {t}/o", "m.onnx", {"m.onnx": b""}),  # 23.4
    C("profile", "garbage .onnx", "profile {t}/m.onnx --out {t}/o", "m.onnx", {"m.onnx": bytes(range(256)) * 3}),  # 23.4
    C("profile", "truncated .onnx", "profile {t}/m.onnx --out {t}/o", "m.onnx", {"m.onnx": copy_of("{b}/model.onnx", lambda d: d[: len(d) // 2])}),
    C("profile", "missing file", "profile {t}/none.pt --out {t}/o", "none.pt"),
    C("profile", "unknown model name", "profile nosuchmodel --out {t}/o", "nosuchmodel"),
    C("profile", "--input-size 0", f"profile {CK} --input-size 0", "--input-size"),
    C("profile", "--num-classes 0", "profile cnn_tiny --num-classes 0", "--num-classes"),
    C("profile", "--in-channels 0", "profile cnn_tiny --in-channels 0", "--in-channels"),
    C("profile", "--threads -1", f"profile {CK} --threads -1", "--threads"),  # 23.6
    C("profile", "--warmup -1", f"profile {CK} --warmup -1", "--warmup"),
    C("profile", "--repeats 0", f"profile {CK} --repeats 0", "--repeats"),
    C("profile", "--latency-batch 0", f"profile {CK} --latency-batch 0", "--latency-batch"),
    C("profile", "--seed -1", f"profile {CK} --seed -1", "--seed"),
    C("profile", "language-model checkpoint", f"profile {LMCK} --out {{t}}/o --no-latency", "language model"),  # 23.5
    C("profile", "model entry not a dict", "profile {b}/notdict.pt --out {t}/o --no-latency", "not a state dict"),  # 23.4
    C("profile", "a folder", "profile {b}/student --out {t}/o --no-latency", "folder"),
    # ------------------------------------------------------------------------------------------- prune
    C("prune", "--sparsity 1", f"prune {CK} --sparsity 1", "--sparsity"),
    C("prune", "--sparsity -0.1", f"prune {CK} --sparsity -0.1", "--sparsity"),
    C("prune", "--sparsity nan", f"prune {CK} --sparsity nan", "--sparsity"),
    C("prune", "no --sparsity", f"prune {CK}", "--sparsity"),
    C("prune", "--steps 0", f"prune {CK} --sparsity 0.5 --steps 0", "--steps"),
    C("prune", "--importance-batches 0", f"prune {CK} --sparsity 0.5 --importance-batches 0", "--importance-batches"),
    C("prune", "--lr 0", f"prune {CK} --sparsity 0.5 --lr 0", "--lr"),
    C("prune", "--alpha 2", f"prune {CK} --sparsity 0.5 --alpha 2", "--alpha"),
    C("prune", "--T 0", f"prune {CK} --sparsity 0.5 --T 0", "--T"),
    C("prune", "--finetune-epochs -1", f"prune {CK} --sparsity 0.5 --finetune-epochs -1", "--finetune-epochs"),
    C("prune", "--batch-size 0", f"prune {CK} --sparsity 0.5 --batch-size 0", "--batch-size"),
    C("prune", "--distill teacher without --teacher", f"prune {CK} --sparsity 0.5 --finetune-epochs 1 --distill teacher --out {{t}}/o", "--teacher"),
    C("prune", "--teacher missing", f"prune {CK} --sparsity 0.5 --finetune-epochs 1 --distill teacher --teacher {{t}}/none.pt --out {{t}}/o", "none.pt"),
    C("prune", "language-model checkpoint", f"prune {LMCK} --sparsity 0.5 --out {{t}}/o", "language model"),  # 23.5
    C("prune", "an ONNX file", "prune {b}/model.onnx --sparsity 0.5 --out {t}/o", "ONNX"),
    C("prune", "unknown --dataset", f"prune {CK} --sparsity 0.5 --dataset nosuch --out {{t}}/o", "nosuch"),
    C("prune", "model entry not a dict", "prune {b}/notdict.pt --sparsity 0.5 --out {t}/o", "not a state dict"),
    # ----------------------------------------------------------------------------------------- quantize
    C("quantize", "--act-bits abc", f"quantize {CK} --act-bits abc", "--act-bits"),  # 23.6
    C("quantize", "--act-bits 1", f"quantize {CK} --act-bits 1", "--act-bits"),
    C("quantize", "--bits 1", f"quantize {CK} --bits 1", "--bits"),
    C("quantize", "--bits 17", f"quantize {CK} --bits 8 17", "--bits"),
    C("quantize", "--calib-batches 0", f"quantize {CK} --calib-batches 0", "--calib-batches"),  # 23.6
    C("quantize", "--mode int4", f"quantize {CK} --mode int4", "--mode"),
    C("quantize", "--epochs -1", f"quantize {CK} --mode qat --epochs -1", "--epochs"),
    C("quantize", "--lr -1", f"quantize {CK} --mode qat --lr -1", "--lr"),
    C("quantize", "--calibration misspelt", f"quantize {CK} --calibration entropi", "did you mean 'entropy'"),
    C("quantize", "language-model checkpoint", f"quantize {LMCK} --out {{t}}/o", "language model"),
    C("quantize", "an ONNX file", "quantize {b}/model.onnx --out {t}/o", "ONNX"),
    C("quantize", "unknown --dataset", f"quantize {CK} --dataset nosuch --out {{t}}/o", "nosuch"),
    C("quantize", "--threads 0", f"quantize {CK} --threads 0", "--threads"),
    # ------------------------------------------------------------------------------------------- export
    C("export", "--atol -1", f"export {CK} --atol -1 --out {{t}}/o", "--atol"),  # 23.5
    C("export", "--rtol -1", f"export {CK} --rtol -1 --out {{t}}/o", "--rtol"),
    C("export", "--atol nan", f"export {CK} --atol nan --out {{t}}/o", "--atol"),
    C("export", "--input-size 0", f"export {CK} --input-size 0", "--input-size"),
    C("export", "--opset text", f"export {CK} --opset abc", "--opset"),
    C("export", "language-model checkpoint", f"export {LMCK} --out {{t}}/o", "language model"),  # 23.5
    C("export", "checkpoint missing", "export {t}/none.pt --out {t}/o", "none.pt"),
    C("export", "an ONNX file", "export {b}/model.onnx --out {t}/o", "ONNX"),
    C("export", "model entry not a dict", "export {b}/notdict.pt --out {t}/o", "not a state dict"),
    C("export", "--model-out below a file", f"export {CK} --model-out {{t}}/f/m.onnx --out {{t}}/o", "f", {"f": "keep"}),
    C("export", "garbage checkpoint", "export {t}/g.pt --out {t}/o", "g.pt", {"g.pt": b"garbage" * 10}),
    # --model-out the input checkpoint once replaced it with an ONNX file (exit 0): refused, the file kept
    C("export", "--model-out is the input checkpoint", "export {t}/c.pt --model-out {t}/c.pt --out {t}/o",
      "input checkpoint", {"c.pt": copy_of(CK)}),
    C("export", "--model-out not .onnx", f"export {CK} --model-out {{t}}/m.pt --out {{t}}/o", ".onnx"),
    C("prune", "--model-out is the input checkpoint", "prune {t}/c.pt --sparsity 0.5 --model-out {t}/c.pt --out {t}/o",
      "input checkpoint", {"c.pt": copy_of(CK)}),
    # ------------------------------------------------------------------------------------------- deploy
    C("deploy", "no --student", f"deploy --teacher {TCK}", "--student"),
    C("deploy", "--sparsities 1.5", f"deploy --student {CK} --teacher {TCK} --sparsities 1.5", "--sparsities"),
    C("deploy", "--finetune-epochs -1", f"deploy --student {CK} --teacher {TCK} --finetune-epochs -1", "--finetune-epochs"),
    C("deploy", "--calib-batches 0", f"deploy --student {CK} --teacher {TCK} --calib-batches 0", "--calib-batches"),
    C("deploy", "--steps 0", f"deploy --student {CK} --teacher {TCK} --steps 0", "--steps"),
    C("deploy", "--alpha -1", f"deploy --student {CK} --teacher {TCK} --alpha -1", "--alpha"),
    C("deploy", "--lr 0", f"deploy --student {CK} --teacher {TCK} --lr 0", "--lr"),
    C("deploy", "teacher missing", f"deploy --student {CK} --teacher {{t}}/none.pt --out {{t}}/o", "none.pt"),
    # a refused checkpoint leaves no empty output folder behind (quiet)
    C("profile", "--num-classes with a checkpoint", f"profile {CK} --num-classes 3 --out {{t}}/o", "apply to a model name", quiet=True),
    C("profile", "--num-classes 1 with a model name", "profile cnn_tiny --num-classes 1 --out {t}/o", "--num-classes", quiet=True),
    C("deploy", "corrupt student: no --out folder made", f"deploy --student {{t}}/s.pt --teacher {TCK} --out {{t}}/o", "s.pt",
      {"s.pt": bytes(range(256)) * 8}, quiet=True),
    C("deploy", "5-class teacher: no --out folder made", f"deploy --student {CK} --teacher {{b}}/five.pt --out {{t}}/o", "5 classes", quiet=True),
    C("export", "corrupt checkpoint: no runs/compress folder made", "export {t}/s.pt", "s.pt", {"s.pt": bytes(range(256)) * 8}, quiet=True),
    C("export", "--opset 0: no --out folder made", f"export {CK} --opset 0 --out {{t}}/o/x", "--opset 0", quiet=True),
    C("prune", "pickled list: no --out folder made", f"prune {{t}}/s.pt --sparsity 0.5 --out {{t}}/o/x", "no 'model' entry",
      {"s.pt": torch_file(lambda b: [1, 2, 3])}, quiet=True),
    C("quantize", "corrupt teacher: no --out folder made", f"quantize {CK} --mode qat --distill teacher --teacher {{t}}/t.pt --out {{t}}/o",
      "t.pt", {"t.pt": bytes(range(256)) * 8}, quiet=True),
    C("robustness", "corrupt checkpoint: no runs/robustness folder made", "robustness {t}/s.pt", "s.pt",
      {"s.pt": bytes(range(256)) * 8}, quiet=True),
    C("deploy", "language-model student", f"deploy --student {LMCK} --teacher {TCK} --out {{t}}/o", "language model"),
    # -------------------------------------------------------------------------------------------- bench
    C("bench", "--steps 0", "bench --steps 0 --teacher cnn_tiny --student cnn_tiny", "--steps"),  # 23.4
    C("bench", "--batch-size 0", "bench --batch-size 0", "--batch-size"),
    C("bench", "--repeats 0", "bench --repeats 0", "--repeats"),
    C("bench", "--image-size 0", "bench --image-size 0", "--image-size"),
    C("bench", "--channels 0", "bench --channels 0", "--channels"),
    C("bench", "--num-classes 1", "bench --num-classes 1", "--num-classes"),
    C("bench", "--mask-steps 0", "bench --mask-steps 0", "--mask-steps"),
    C("bench", "--threads -1", "bench --threads -1", "--threads"),
    C("bench", "--against unknown tool", "bench --against foo --steps 1", "--against"),  # issue 30
    C("bench", "unknown --variants", "bench --teacher cnn_tiny --student cnn_tiny --variants kd-fast --steps 1", "--variants"),
    C("bench", "--amp fp8", "bench --amp fp8", "--amp"),
    C("bench", "--seeds without --study", "bench --seeds 1", "--study only"),
    C("bench", "--synthetic-cifar 5", "bench --study digits/full --synthetic-cifar 5", "--synthetic-cifar"),
    C("bench", "--study recipe not found", "bench --study {t}/none.yaml --out {t}/o", "none.yaml"),
    C("bench", "--mask-reuse unknown", f"bench --study {SR} --mask-reuse per-pixel --out {{t}}/o", "per-pixel"),
    # every bench option is checked before its header is printed or any data is written (quiet)
    C("bench", "--variants unknown, nothing printed", "bench --variants foo", "--variants: unknown 'foo'", quiet=True),
    C("bench", "--variants empty", "bench --variants=", "--variants: an empty name", quiet=True),
    C("bench", "--variants with an empty name", "bench --variants baseline,", "--variants: an empty name", quiet=True),
    C("bench", "--variants repeated", "bench --variants baseline,baseline", "each variant once", quiet=True),
    C("bench", "--teacher unknown", "bench --teacher nosuch --variants kd-live", "--teacher: unknown model 'nosuch'", quiet=True),
    C("bench", "--student unknown", "bench --student nosuch --variants baseline", "--student: unknown model 'nosuch'", quiet=True),
    C("bench", "--layers of one name", "bench --layers foo --variants full-live", "--layers takes", quiet=True),
    C("bench", "--layers the student lacks", "bench --layers x,layer3 --variants full-live", "--layers: CifarResNet has no layer(s) ['x']", quiet=True),
    C("bench", "--json is a folder", "bench --json {t} --variants baseline", "is a folder", quiet=True),
    C("bench", "--json below a file", "bench --json {t}/f/x.json --variants baseline", "/f is a file", {"f": "keep"}, quiet=True),
    C("bench", "--against --variants unknown", "bench --against torchdistill --variants foo", "--variants takes", quiet=True),
    C("bench", "--against a model torchdistill lacks", "bench --against torchdistill --teacher resnet8", "got --teacher resnet8", quiet=True),
    C("bench", "--accuracy --seeds repeated", "bench --accuracy --seeds 0 0", "given twice", quiet=True),
    C("bench", "--accuracy --epochs 0", "bench --accuracy --epochs 0", "--epochs", quiet=True),
    C("bench", "--accuracy --synthetic-cifar 0", "bench --accuracy --synthetic-cifar 0", "--synthetic-cifar", quiet=True),
    C("bench", "--accuracy --student unknown", "bench --accuracy --student nosuch --synthetic-cifar 10", "--student: unknown model", quiet=True),
    C("bench", "--accuracy --set unknown key", "bench --accuracy --set train.foo=1 --synthetic-cifar 10", "train.foo", quiet=True),
    C("bench", "--accuracy --out is a file", "bench --accuracy --out {t}/f --synthetic-cifar 10", "is a file", {"f": "keep"}, quiet=True),
    C("bench", "--study --synthetic-cifar -5", "bench --study digits/kd --synthetic-cifar -5", "--synthetic-cifar", quiet=True),
    C("bench", "--study --out holding a study", "bench --study cifar10/kd --synthetic-cifar 10 --out {t}/o", "not empty",
      {"o/study/x": "keep"}, quiet=True),
    C("bench", "--study --set unknown key (synthetic data)", "bench --study cifar10/kd --synthetic-cifar 10 --set train.foo=1", "train.foo", quiet=True),
    C("bench", "--study --set study.methods unknown", "bench --study cifar10/kd --synthetic-cifar 10 --set study.methods=foo", "study.methods", quiet=True),
    C("bench", "--study --teacher-set unknown key", "bench --study cifar10/kd --synthetic-cifar 10 --teacher-set train.foo=1", "teacher.yaml", quiet=True),
    C("bench", "--study --teacher-set without teacher.recipe", "bench --study digits/kd --set teacher.recipe=null --teacher-set train.epochs=1", "teacher.recipe", quiet=True),
    C("bench", "--study --mask-reuse unknown (synthetic data)", "bench --study cifar10/kd --synthetic-cifar 10 --mask-reuse foo", "'foo'", quiet=True),
    C("bench", "--study --mask-reuse repeated", "bench --study cifar10/kd --mask-reuse per-view,per-view", "each once", quiet=True),
    # ----------------------------------------------------------------------------------------------- lm
    C("lm", "recipe not found", f"lm train-teacher {{t}}/none.yaml {D}", "none.yaml"),
    C("lm", "unknown recipe key", f"lm train-teacher {LMR} --set nosuch=1 --out {{t}}/o {D}", "nosuch"),
    C("lm", "corpus.seq_len 0", f"lm train-teacher {LMR} --set corpus.seq_len=0 --out {{t}}/o {D}", "seq_len"),
    C("lm", "arithmetic teacher through train-teacher", f"lm train-teacher lm/arithmetic --out {{t}}/o {D}", "lm ablate"),
    C("lm", "distill --method not in the study", f"lm distill {LMR} --method nosuch --out {{t}}/o {D}", "nosuch"),
    C("lm", "ablate --methods not in the study", f"lm ablate {LMR} --methods nosuch --out {{t}}/o {D}", "nosuch"),
    C("lm", "ablate --seeds text", f"lm ablate {LMR} --seeds x {D}", "'x' is not a seed"),
    C("lm", "teacher with another tokenizer (distill)", f"lm distill {LMR} --set teacher.checkpoint={{lm}}/bpe/teacher/best.pt --set 'distill.loss=[{{{{term: fkl}}}}]' --out {{t}}/o {D}", "tokenizer"),  # 23.4
    C("lm", "teacher with another tokenizer (ablate)", f"lm ablate {LMR} --set teacher.checkpoint={{lm}}/bpe/teacher/best.pt --out {{t}}/o {D}", "tokenizer"),  # 23.4
    C("lm", "corpus folder missing (ablate)", f"lm ablate {LMR} --set corpus.name={{t}}/nocorpus --out {{t}}/o {D}", "nocorpus"),
    C("lm", "corpus folder missing (train-teacher)", f"lm train-teacher {LMR} --set corpus.name={{t}}/nocorpus --out {{t}}/o {D}", "nocorpus"),
    C("lm", "teacher.checkpoint missing", f"lm distill {LMR} --set teacher.checkpoint={{t}}/none.pt --out {{t}}/o {D}", "none.pt"),
    C("lm", "teacher.checkpoint corrupt: no --out folder made", f"lm distill {LMR} --set teacher.checkpoint={{t}}/t.pt --out {{t}}/o {D}", "t.pt is corrupt",
      {"t.pt": bytes(range(256)) * 8}, quiet=True),
    C("lm", "teacher.checkpoint a pickled list (ablate)", f"lm ablate {LMR} --set teacher.checkpoint={{t}}/t.pt --out {{t}}/o {D}", "no 'model' entry",
      {"t.pt": torch_file(lambda b: [1, 2, 3])}, quiet=True),
    C("lm", "teacher.checkpoint is a folder", f"lm distill {LMR} --set teacher.checkpoint={{t}}/d --out {{t}}/o {D}", "d is a folder",
      {"d/x.txt": "x"}, quiet=True),
    C("lm", "teacher.checkpoint is an image classifier", f"lm distill {LMR} --set teacher.checkpoint={CK} --set 'distill.loss=[{{{{term: fkl}}}}]' --out {{t}}/o {D}", "language model"),
    C("lm", "corrupt tokenizer.json in the output folder", f"lm distill {LMR} --out {{t}}/o {D}", "o/tokenizer.json", {"o/tokenizer.json": "{garbage"}),
    C("lm", "tokenizer.json of another shape", f"lm distill {LMR} --out {{t}}/o {D}", "'kind'", {"o/tokenizer.json": "[1, 2]"}),
    C("lm", "generate --max-new -5", f"lm generate {LMCK} --prompt hi --max-new -5", "--max-new"),  # 23.6
    C("lm", "generate --max-new 0", f"lm generate {LMCK} --prompt hi --max-new 0", "--max-new"),
    C("lm", "generate --temperature -1", f"lm generate {LMCK} --prompt hi --temperature -1", "--temperature"),
    C("lm", "generate --top-k 0", f"lm generate {LMCK} --prompt hi --top-k 0", "--top-k"),
    C("lm", "generate empty prompt", f"lm generate {LMCK} --prompt ''", "--prompt"),
    C("lm", "generate prompt longer than max_len", f"lm generate {LMCK} --prompt {'x' * 60} --max-new 4", "max_len"),
    C("lm", "generate an image classifier", f"lm generate {CK} --prompt hi", "not a kdlab language model"),
    C("lm", "generate a missing checkpoint", "lm generate {t}/none.pt --prompt hi", "none.pt"),
    C("lm", "generate without --prompt", f"lm generate {LMCK}", "--prompt"),
    C("lm", "misspelt subcommand", "lm generat x", "did you mean `kdlab lm generate`"),
    C("lm", "generate --seed -1", f"lm generate {LMCK} --prompt hi --seed -1", "--seed"),
    # --------------------------------------------------------------------------------------------- tune
    C("tune", "--param on a section the recipe lacks", f"tune {SR} --param nosuch.x=0.1:1 --trials 1 --out {{t}}/o", "search path nosuch.x", quiet=True),
    C("tune", "--param on an unknown train key", f"tune {SR} --param train.foo=0.1:1 --trials 1 --out {{t}}/o", "train.foo: unknown key 'foo'", quiet=True),
    C("tune", "--storage unknown scheme", f"tune {SR} --param train.lr=0.01:0.1 --trials 1 --storage foo://x --out {{t}}/o {D}", "unknown scheme"),  # 23.4
    C("tune", "--storage sqlite in a missing folder", f"tune {SR} --param train.lr=0.01:0.1 --trials 1 --storage sqlite:///{{t}}/none/x.db --out {{t}}/o {D}", "does not exist"),  # 23.4
    C("tune", "--storage journal in a missing folder", f"tune {SR} --param train.lr=0.01:0.1 --trials 1 --storage {{t}}/none/x.journal --out {{t}}/o {D}", "does not exist"),  # 23.4
    C("tune", "--storage corrupt journal (left as it is)", f"tune {SR} --param train.lr=0.01:0.1 --trials 1 --storage {{t}}/j.journal --out {{t}}/o {D}", "j.journal",
      {"j.journal": "garbage{\n"}),  # 23.4
    C("tune", "--storage journal with a torn last line", f"tune {SR} --param train.lr=0.01:0.1 --trials 1 --storage {{t}}/j.journal --out {{t}}/o {D}", "cut off",
      {"j.journal": '{"op_code": 0, "worker_id": "w", "study_name": "s", "directions": [1]}\n{"op_code": 0'}),
    C("tune", "--storage is a folder", f"tune {SR} --param train.lr=0.01:0.1 --trials 1 --storage {{t}} --out {{t}}/o {D}", "folder"),
    C("tune", "--param of an unknown key", f"tune {SR} --param train.nosuch=0:1 --trials 1 --out {{t}}/o {D}", "nosuch"),
    C("tune", "--param range text", f"tune {SR} --param train.lr=abc --trials 1 --out {{t}}/o {D}", "train.lr"),
    C("tune", "--param of a missing loss term", f"tune {SR} --param loss.nosuch.weight=0:1 --trials 1 --out {{t}}/o {D}", "nosuch"),
    C("tune", "no --param", f"tune {SR} --trials 1 --out {{t}}/o {D}", "--param"),
    C("tune", "--trials 0", f"tune {SR} --param train.lr=0.01:0.1 --trials 0", "--trials"),
    C("tune", "--jobs 0", f"tune {SR} --param train.lr=0.01:0.1 --jobs 0", "--jobs"),
    C("tune", "--warmup-epochs -1", f"tune {SR} --param train.lr=0.01:0.1 --warmup-epochs -1", "--warmup-epochs"),
    C("tune", "--then-study -1", f"tune {SR} --param train.lr=0.01:0.1 --then-study -1", "--then-study"),
    C("tune", "--direction up", f"tune {SR} --param train.lr=0.01:0.1 --direction up", "--direction"),
    C("tune", "--worker without recipe or study name", f"tune --worker --out {{t}}/o {D}", "--study-name"),
    C("tune", "no recipe", f"tune --out {{t}}/o {D}", "recipe"),
    # -------------------------------------------------------------------------------------------- usage
    C("usage", "no command", "", "COMMAND"),
    C("usage", "misspelt command names a real one", "losss", "did you mean `kdlab losses`"),  # 23.5
    C("usage", "misspelt distill", "distil x", "did you mean `kdlab distill`"),
    C("usage", "unknown command far from any", "zzzz", "unknown command 'zzzz'"),
    C("usage", "lm without a subcommand", "lm", "LM_COMMAND"),
    C("usage", "models with an argument", "models extra", "kdlab models --help"),
    C("usage", "unknown top-level option", "--nosuch", "--nosuch"),
]


# ------------------------------------------------------------------------------- the Python API
def _fit(**kw):
    import torch
    from torch.utils.data import TensorDataset

    import kdlab
    from kdlab.models import create_model

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    args = dict(train_data=TensorDataset(x, y), val_data=TensorDataset(x, y), loss=[{"term": "ce"}], num_classes=10,
                train={"epochs": 1, "batch_size": 8, "device": "cpu"})
    teacher = kw.pop("teacher", None)
    args.update(kw)
    return kdlab.fit(create_model("cnn_tiny", num_classes=10, in_channels=1), teacher, **args)


def _empty():
    import torch
    from torch.utils.data import TensorDataset

    return TensorDataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long))


def _nan_pixels():
    import torch
    from torch.utils.data import TensorDataset

    x = torch.rand(16, 1, 8, 8)
    x[3, 0, 2, 2] = float("nan")
    return TensorDataset(x, torch.randint(0, 10, (16,)))


def _dl(ds):
    from torch.utils.data import DataLoader

    return DataLoader(ds, batch_size=4)


CASES += [
    C("api", "kdlab.fit with an empty training set", lambda t, b: _fit(train_data=_empty(), run_dir=t / "r"), "train_data", kind="api"),  # 23.4
    C("api", "kdlab.fit with an empty DataLoader", lambda t, b: _fit(train_data=_dl(_empty()), run_dir=t / "r"), "train_data", kind="api"),  # 23.4
    C("api", "kdlab.fit with an empty validation set", lambda t, b: _fit(val_data=_empty(), run_dir=t / "r"), "val_data", kind="api"),
    C("api", "kdlab.fit with NaN pixels", lambda t, b: _fit(train_data=_nan_pixels(), run_dir=t / "r"), "NaN", kind="api"),  # 23.5
    C("api", "kdlab.fit with NaN pixels in a DataLoader", lambda t, b: _fit(train_data=_dl(_nan_pixels()), run_dir=t / "r"), "NaN", kind="api"),
    C("api", "kdlab.fit with a NaN KD temperature", lambda t, b: _fit(loss=[{"term": "ce"}, {"term": "kd", "T": float("nan")}],
                                                                    teacher="cnn_tiny", run_dir=t / "r"), "loss[1].T", kind="api"),
    C("api", "kdlab.fit with every weight 0", lambda t, b: _fit(loss=[{"term": "ce", "weight": 0}], run_dir=t / "r"), "weight 0", kind="api"),
    C("api", "kdlab.fit with train.lr 0", lambda t, b: _fit(train={"lr": 0}, run_dir=t / "r"), "train.lr", kind="api"),
    C("api", "kdlab.fit with an unknown train key", lambda t, b: _fit(train={"lrr": 0.1}, run_dir=t / "r"), "lrr", kind="api"),
    C("api", "kdlab.fit with an unknown loss term", lambda t, b: _fit(loss=[{"term": "kdd"}], run_dir=t / "r"), "see `kdlab losses`", kind="api"),  # 23.5
]

# detection canvas options with the wrong type: one line naming the key and its form, not a traceback
_DB = "distill detection/baseline --set train.epochs=1 --out {t}/o --quiet"
CASES += [
    C("distill", "detection scenes not a list", f"{_DB} --set data.kwargs.scenes=abc", "data.kwargs.scenes must be"),
    C("distill", "detection scenes fractional", f"{_DB} --set data.kwargs.scenes=[16.5,8,8]", "whole numbers"),
    C("distill", "detection objects fractional", f"{_DB} --set data.kwargs.objects=[1.5,3]", "data.kwargs.objects"),
    C("distill", "detection scale not a list", f"{_DB} --set data.kwargs.scale=abc", "data.kwargs.scale must be"),
]
CASES += [
    C("bench", "against torchdistill with an unknown variant", "bench --against torchdistill --variants kd-live,nonsense",
      "--variants takes"),
]
CASES += [
    C("lm", "an override the study method would ignore", "lm distill lm/docs --method minillm "
      "--set distill.minillm.alpha=0.9 --out {t}/o --quiet", "study.methods.minillm.minillm.alpha"),
]
# new-user review: memory, flags ignored by a mode, output folders and devices checked before a teacher trains
CASES += [
    C("bench", "--batch-size too large for memory", "bench --batch-size 100000000 --variants baseline",
      "memory ran out"),
]
# a step-benchmark option with --study / --accuracy (ignored before), an empty --out or --study
CASES += [
    C("bench", "--study with --against", "bench --study digits/full --against torchdistill", "--against applies to the step benchmark only", quiet=True),
    C("bench", "--study with --variants", "bench --study digits/full --variants kd-live", "--variants applies", quiet=True),
    C("bench", "--study with --teacher and --steps", "bench --study digits/full --teacher resnet8 --steps 2",
      "--teacher, --steps apply to the step benchmark only", quiet=True),
    C("bench", "--study with --channels-last", "bench --study digits/full --channels-last", "--channels-last", quiet=True),
    C("bench", "--study with --json", "bench --study digits/full --json {t}/x.json", "--json", quiet=True),
    C("bench", "--accuracy with --batch-size", "bench --accuracy --batch-size 8 --synthetic-cifar 10", "--batch-size", quiet=True),
    C("bench", "--accuracy with --repeats", "bench --accuracy --repeats 2 --synthetic-cifar 10", "--repeats", quiet=True),
    C("bench", "--accuracy with --mode", "bench --accuracy --mode loo --synthetic-cifar 10", "--mode", quiet=True),
    C("bench", "--against with --image-size", "bench --against torchdistill --image-size 16", "--image-size", quiet=True),
    C("bench", "step benchmark with --out", "bench --out {t}/o --variants baseline", "--out", quiet=True),
    C("bench", "--study --out empty", "bench --study digits/full --out=", "--out: give a folder path", quiet=True),
    C("bench", "--accuracy --out empty", "bench --accuracy --out= --synthetic-cifar 10", "--out: give a folder path", quiet=True),
]
CASES += [
    C("bench", "--study empty", "bench --study=", "--study: give a study recipe", quiet=True),
    C("bench", "--against --variants of empty names", "bench --against torchdistill --variants ,",
      "--variants: an empty name", quiet=True),
]
# --out and --device are refused before a missing teacher is trained ({t}/tt must not appear)
_NEWT = f"--set teacher.checkpoint={{t}}/tt/best.pt --set teacher.recipe={TR} --set train.epochs=1 {D}"
CASES += [
    C("distill", "--out a file, teacher missing", f"distill {SR} {_NEWT} --out {{t}}/f", "run folder", {"f": "keep"}, quiet=True),
    C("distill", "--device cuda without one, teacher missing", f"distill {SR} {_NEWT} --device cuda --out {{t}}/o",
      "no CUDA device", quiet=True),
    C("ablate", "--device cuda without one, teacher missing", f"ablate {SR} {_NEWT} --device cuda --seeds 0 --out {{t}}/o",
      "no CUDA device", quiet=True),
    C("compare", "--out a file, teacher missing", f"compare {SR} --baseline student {_NEWT} --seeds 0 --out {{t}}/f",
      "compare folder", {"f": "keep"}, quiet=True),
    C("compare", "--device cuda without one, teacher missing", f"compare {SR} --baseline student {_NEWT} --seeds 0 "
      f"--device cuda --out {{t}}/o", "no CUDA device", quiet=True),
    C("sweep", "--device cuda without one, teacher missing", f"sweep {SR} {_NEWT} --seeds 0 --device cuda --out {{t}}/o",
      "no CUDA device", quiet=True),
    C("tune", "--device cuda without one, teacher missing", f"tune {SR} {_NEWT} --param loss.kd.T=2:8 --device cuda "
      f"--out {{t}}/o", "no CUDA device", quiet=True),
    C("paradigm", "--device cuda without one, teacher missing", f"paradigm dml {SR} {_NEWT} --device cuda --out {{t}}/o",
      "no CUDA device", quiet=True),
    C("bench", "--study --device cuda without one, teacher missing", f"bench --study {SR} --set teacher.checkpoint={{t}}/tt/best.pt "
      f"--set teacher.recipe={TR} --set train.epochs=1 --device cuda --seeds 0 --out {{t}}/o", "no CUDA device", quiet=True),
    C("bench", "--accuracy --device cuda without one", "bench --accuracy --synthetic-cifar 10 --device cuda --out {t}/o",
      "no CUDA device", quiet=True),
    C("lm", "distill --device cuda without one", f"lm distill {LMR} --device cuda --out {{t}}/o {D}", "no CUDA device", quiet=True),
]
