"""Distil one Hugging Face causal LM into a smaller one, offline, on a local chat jsonl file.

1. A byte-level BPE tokenizer is trained with ``tokenizers`` on the instruction data and saved as a
   ``transformers`` tokenizer with a chat template (``<|user|>…<|end|><|assistant|>…<|end|>``).
2. A Llama-config teacher (4 layers, d = 64) is built with ``from_config`` and trained briefly by
   kdlab (cross-entropy on the completion tokens only).
3. A GPT-2-config student (2 layers, d = 32) is distilled from it (0.5·CE + 0.5·forward KL, plus
   cosine hidden-state matching through the uniform layer map 1→2, 2→4 with learned projections),
   once fully and once as a LoRA adapter (base frozen, adapter merged into the saved folder).
4. Each saved folder is loaded with ``AutoModelForCausalLM.from_pretrained`` and greedy-decoded; the
   tokens are checked against kdlab's own generation from ``student.pt`` (what ``kdlab lm generate``
   runs).

    OMP_NUM_THREADS=1 python examples/hf_distill.py --out runs/hf-distill
    kdlab lm generate runs/hf-distill/student/student.pt --prompt "<|user|>what is 3 plus 4?<|end|><|assistant|>" --max-new 8

Every number printed is a function of --seed and the thread count.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch


def write_data(path: Path, n: int, seed: int) -> None:
    """Instruction records: small additions and subtractions, in words."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            a, b = rng.randrange(20), rng.randrange(20)
            op, val = (("plus", a + b) if rng.random() < 0.5 else ("minus", a - b))
            f.write(json.dumps({"messages": [{"role": "user", "content": f"what is {a} {op} {b}?"},
                                             {"role": "assistant", "content": f"{a} {op} {b} is {val}."}]}) + "\n")


def main(argv=None) -> dict:
    from transformers import AutoModelForCausalLM

    from kdlab.lm.generate import generate
    from kdlab.lm.hf import hf_train, init_hf_model, load_records, train_hf_tokenizer
    from kdlab.lm.runs import load_lm

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/hf-distill")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher-epochs", type=int, default=6)
    ap.add_argument("--student-epochs", type=int, default=3)
    ap.add_argument("--n", type=int, default=400, help="training records")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    write_data(out / "train.jsonl", a.n, a.seed)
    write_data(out / "val.jsonl", 64, a.seed + 1)
    texts = [m["content"] for r in load_records(out / "train.jsonl") for m in r["messages"]]
    train_hf_tokenizer(texts, out / "tokenizer", vocab_size=320)
    init_hf_model(out / "teacher_init", out / "tokenizer", "llama", seed=a.seed, hidden_size=64, intermediate_size=128,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    init_hf_model(out / "student_init", out / "tokenizer", "gpt2", seed=a.seed, n_embd=32, n_layer=2, n_head=2,
                  n_positions=64)
    common = dict(val_data=out / "val.jsonl", batch_size=16, seed=a.seed)
    teacher = hf_train(f"hf:{out / 'teacher_init'}", out / "train.jsonl", out / "teacher", terms=["ce"],
                       epochs=a.teacher_epochs, lr=3e-3, **common)
    terms = [{"term": "ce", "weight": 0.5}, {"term": "fkl", "weight": 0.5}]
    runs = {"teacher": teacher}
    runs["student"] = hf_train(f"hf:{out / 'student_init'}", out / "train.jsonl", out / "student",
                               teacher=f"hf:{teacher['hf_dir']}", terms=terms, hidden={"loss": "cos", "weight": 0.1},
                               epochs=a.student_epochs, lr=3e-3, **common)
    runs["student_lora"] = hf_train(f"hf:{out / 'student_init'}", out / "train.jsonl", out / "student_lora",
                                    teacher=f"hf:{teacher['hf_dir']}", terms=terms,
                                    lora={"r": 8, "alpha": 16, "target_modules": ["c_attn", "c_proj", "c_fc"]},
                                    epochs=a.student_epochs, lr=1e-2, **common)
    prompt = "<|user|>what is 3 plus 4?<|end|><|assistant|>"
    report = {}
    for name, r in runs.items():
        hf = AutoModelForCausalLM.from_pretrained(r["hf_dir"], local_files_only=True).eval()
        kd, tok, _ = load_lm(r["checkpoint"])
        ids = tok.encode(prompt)
        with torch.no_grad():
            hf_new = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                                 pad_token_id=tok.pad_id)[0, len(ids):].tolist()
        kd_ids, mask = generate(kd, torch.tensor([ids]), 12, eos_id=tok.eos_id, pad_id=tok.pad_id)
        same = kd_ids[0, len(ids):][mask[0]].tolist() == hf_new
        report[name] = {"val_bpb": r["val_bpb"], "val_kl": r.get("val_kl"), "trainable_params": r["trainable_params"],
                        "greedy": tok.decode(hf_new), "transformers_equals_kdlab": same}
        print(f"{name:<13} val bpb {r['val_bpb']:.3f}  trainable {r['trainable_params']:>7,}  "
              f"greedy {tok.decode(hf_new)!r}  transformers == kdlab: {same}")
    (out / "summary.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
