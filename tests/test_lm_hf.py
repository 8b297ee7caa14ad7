"""Hugging Face causal LMs end to end, offline and tiny: tokenizer trained with ``tokenizers``,
GPT-2 / Llama configs built with ``from_config`` and ``save_pretrained``, chat data from a local
jsonl with completion-only loss, distillation with hidden-state matching across depths, a LoRA
student, and a saved folder that ``transformers`` loads and greedy-decodes like ``kdlab lm generate``."""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("peft")

from kdlab.lm.arithmetic import collate  # noqa: E402
from kdlab.lm.hf import (check_same_tokenizer, hf_train, init_hf_model, load_hf, load_records,  # noqa: E402
                         render_example, train_hf_tokenizer)
from kdlab.lm.hidden import HiddenDistill, layer_map  # noqa: E402

TEXTS = [f"what is {a} plus {b}? it is {a + b}." for a in range(10) for b in range(10)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    train_hf_tokenizer(TEXTS, root / "tok", vocab_size=300)
    init_hf_model(root / "teacher0", root / "tok", "llama", hidden_size=32, intermediate_size=64,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    init_hf_model(root / "student0", root / "tok", "gpt2", n_embd=16, n_layer=2, n_head=2, n_positions=64)
    with open(root / "chat.jsonl", "w") as f:
        for a in range(10):
            for b in range(10):
                f.write(json.dumps({"messages": [{"role": "user", "content": f"what is {a} plus {b}?"},
                                                 {"role": "assistant", "content": f"it is {a + b}."}]}) + "\n")
    teacher = hf_train("hf:" + str(root / "teacher0"), root / "chat.jsonl", root / "teacher_run", terms=["ce"],
                       epochs=1, steps_per_epoch=6, batch_size=16, lr=3e-3, log=lambda *_: None)
    return root, teacher


def test_chat_record_is_rendered_with_the_template_and_only_the_completion_is_a_target(world):
    root, _ = world
    _, tok = load_hf(root / "teacher0")
    rec = load_records(root / "chat.jsonl")[12]  # a = 1, b = 2
    p, c = render_example(rec, tok)
    assert tok.decode(p) == "<|user|>what is 1 plus 2?<|end|><|assistant|>"
    assert tok.decode(c) == "it is 3.<|end|>" and c[-1] == tok.eos_id
    b = collate([(p, c)], tok.pad_id)
    targets = b["ids"][0, 1:][b["mask"][0]]
    assert targets.tolist() == c  # exactly the completion tokens are trained on


def test_text_and_parquet_records(world, tmp_path):
    root, _ = world
    _, tok = load_hf(root / "teacher0")
    (tmp_path / "d.txt").write_text("what is 1 plus 1?\nit is 2.\n")
    recs = load_records(tmp_path / "d.txt")
    assert [r["text"] for r in recs] == ["what is 1 plus 1?", "it is 2."]
    p, c = render_example(recs[1], tok)
    assert p + c == tok.encode("it is 2.") + [tok.eos_id] and len(p) == 1
    import datasets

    datasets.Dataset.from_list([{"prompt": "what is 2 plus 2?", "completion": "it is 4."}]).to_parquet(str(tmp_path / "d.parquet"))
    p, c = render_example(load_records(tmp_path / "d.parquet")[0], tok)
    assert tok.decode(c) == "it is 4.<|end|>"


def test_layer_map_and_hidden_losses_by_hand():
    assert layer_map(2, 4) == [(1, 2), (2, 4)]
    assert layer_map(3, 4) == [(1, 1), (2, 3), (3, 4)]  # round(4/3)=1, round(8/3)=3
    assert layer_map(2, 4, [[0, 0], [2, 3]]) == [(0, 0), (2, 3)]
    with pytest.raises(ValueError, match="outside"):
        layer_map(2, 4, [[3, 1]])
    h = HiddenDistill(1, 1, 3, 3, loss="cos", layers=[[1, 1]])
    with torch.no_grad():
        h.proj[0].weight.copy_(2 * torch.eye(3))
    hs = [None, torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]])]
    ht = [None, torch.tensor([[[5.0, 0, 0], [1.0, 0, 0]]])]
    # position 0: cos(2e1, 5e1) = 1 -> 0; position 1: cos(2e2, e1) = 0 -> 1; mean 0.5
    assert abs(float(h(hs, ht, torch.ones(1, 2, dtype=torch.bool))) - 0.5) < 1e-6
    m = HiddenDistill(1, 1, 3, 3, loss="mse", layers=[[1, 1]])
    with torch.no_grad():
        m.proj[0].weight.copy_(torch.eye(3))
    # (1-5)²/3 = 16/3 at position 0 only (position 1 masked)
    assert abs(float(m(hs, ht, torch.tensor([[True, False]]))) - 16 / 3) < 1e-5


def test_distilled_folder_loads_in_transformers_and_greedy_matches_kdlab_generate(world):
    from transformers import AutoModelForCausalLM

    from kdlab.experiments.commands import lm_generate
    from kdlab.lm.generate import generate
    from kdlab.lm.runs import load_lm

    root, teacher = world
    res = hf_train("hf:" + str(root / "student0"), root / "chat.jsonl", root / "student_run",
                   teacher="hf:" + teacher["hf_dir"], terms=[{"term": "ce", "weight": 0.5}, {"term": "fkl", "weight": 0.5}],
                   hidden={"loss": "cos", "weight": 0.1}, epochs=1, steps_per_epoch=4, batch_size=16, lr=3e-3,
                   log=lambda *_: None)
    # trainable: the whole GPT-2 student + the two projections 16 -> 32 of the uniform map (2 x 512)
    s0 = AutoModelForCausalLM.from_pretrained(str(root / "student0"))
    assert res["trainable_params"] == sum(p.numel() for p in s0.parameters()) + 2 * 16 * 32
    hf = AutoModelForCausalLM.from_pretrained(res["hf_dir"], local_files_only=True).eval()
    kd, tok, _ = load_lm(res["checkpoint"])
    prompt = "<|user|>what is 3 plus 4?<|end|><|assistant|>"
    ids = tok.encode(prompt)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_id)
    hf_new = out[0, len(ids):].tolist()
    kd_out, mask = generate(kd, torch.tensor([ids]), 10, eos_id=tok.eos_id, pad_id=tok.pad_id)
    assert kd_out[0, len(ids):][mask[0]].tolist() == hf_new
    assert lm_generate(res["checkpoint"], prompt, max_new=10) == prompt + tok.decode(hf_new)


def test_lora_student_trains_only_the_adapter_and_merges(world):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, teacher = world
    res = hf_train("hf:" + str(root / "student0"), root / "chat.jsonl", root / "lora_run", teacher="hf:" + teacher["hf_dir"],
                   terms=["fkl"], lora={"r": 4, "alpha": 8, "target_modules": ["c_attn"]}, epochs=1,
                   steps_per_epoch=3, batch_size=16, lr=1e-2, log=lambda *_: None)
    # by hand: per layer A [4, 16] + B [48, 4] on c_attn (16 -> 48); 2 layers
    assert res["trainable_params"] == 2 * (4 * 16 + 48 * 4)
    base = AutoModelForCausalLM.from_pretrained(str(root / "student0")).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(res["hf_dir"]).state_dict()
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert changed and all("c_attn.weight" in k for k in changed)  # the base is frozen; only merged deltas
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(root / "student0")),
                                        str(root / "lora_run" / "adapter")).merge_and_unload().state_dict()
    assert all(torch.allclose(adapted[k], merged[k], atol=1e-6) for k in merged)
    # the merged folder decodes like kdlab's checkpoint of the same student
    from kdlab.experiments.commands import lm_generate
    from kdlab.lm.runs import load_lm

    _, tok, _ = load_lm(res["checkpoint"])
    prompt = "<|user|>what is 5 plus 1?<|end|><|assistant|>"
    ids = tok.encode(prompt)
    hf = AutoModelForCausalLM.from_pretrained(res["hf_dir"]).eval()
    with torch.no_grad():
        new = hf.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_id)[0, len(ids):]
    assert lm_generate(res["checkpoint"], prompt, max_new=8) == prompt + tok.decode(new.tolist())


def test_different_tokenizers_fail_with_one_clear_line(world, tmp_path):
    root, _ = world
    train_hf_tokenizer(["completely different words here"] * 5, tmp_path / "tok2", vocab_size=270)
    init_hf_model(tmp_path / "other", tmp_path / "tok2", "gpt2", n_embd=8, n_layer=1, n_head=2, n_positions=32)
    _, a = load_hf(root / "teacher0")
    _, b = load_hf(tmp_path / "other")
    with pytest.raises(ValueError, match="tokenizer.*differ.*same tokenizer"):
        check_same_tokenizer(a, b)
    with pytest.raises(ValueError, match="not a Hugging Face model folder"):
        load_hf(tmp_path)


def test_cli_hf_distill_with_another_tokenizer_is_one_error_line_and_no_output(world, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root, teacher = world
    train_hf_tokenizer(["completely different words here"] * 5, tmp_path / "tok2", vocab_size=270)
    init_hf_model(tmp_path / "other", tmp_path / "tok2", "gpt2", n_embd=8, n_layer=1, n_head=2, n_positions=32)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "kdlab", "lm", "hf-distill", f"hf:{tmp_path / 'other'}",
                        str(root / "chat.jsonl"), "--teacher", f"hf:{teacher['hf_dir']}", "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, env=env)
    errs = [ln for ln in r.stderr.splitlines() if ln.startswith("kdlab: error:")]
    assert r.returncode == 2 and len(errs) == 1 and "same tokenizer" in errs[0]
    assert not (tmp_path / "run").exists()
