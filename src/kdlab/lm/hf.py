"""Hugging Face causal LMs in kdlab's LM distillation: ``hf:<folder>`` models with the folder's own
tokenizer, local data through ``datasets``, chat templates with the loss on completion tokens only,
LoRA students through ``peft``, hidden-state distillation, and a ``save_pretrained`` output.

* **Models**: ``hf:<folder>`` (or a folder) is ``AutoModelForCausalLM.from_pretrained(folder,
  local_files_only=True)`` behind kdlab's ``(ids, past) -> (logits, past)`` call
  (:class:`kdlab.lm.models.HFCausalLM`) and ``AutoTokenizer`` from the same folder
  (:class:`kdlab.lm.tokenizers.HFTokenizer`). Teacher and student must share the tokenizer (same
  vocabulary and special tokens): token-level divergences compare distributions id by id.
* **Data** (:func:`load_records`): a local ``.jsonl``/``.json``, ``.txt`` or ``.parquet`` file read
  with ``datasets.load_dataset`` offline. A record with ``messages`` (chat: ``[{role, content}]``)
  or ``prompt`` + ``completion`` is rendered with the tokenizer's chat template; the prompt is the
  template applied to all but the last message with the generation prompt, the completion is the
  rest of the rendered text (plus eos), and only completion tokens are targets. A ``text`` record
  is trained on every token after the first.
* **LoRA** (``lora={"r": 8, "alpha": 16, ...}``): the student is wrapped by ``peft.get_peft_model``;
  the base weights are frozen, only the adapter trains; the adapter is saved (``adapter/``) and
  merged into the saved model.
* **Output** of :func:`hf_train`: the Trainer's run folder (``best.pt``, ``result.json``, ...),
  ``hf/`` (``save_pretrained`` weights, config and tokenizer of the best student, LoRA merged) and
  ``student.pt``, a kdlab LM checkpoint of the same weights that ``kdlab lm generate`` reads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from kdlab.core.seeding import derive_seed

DATA_KINDS = {".jsonl": "json", ".json": "json", ".txt": "text", ".text": "text", ".parquet": "parquet"}


def hf_folder(spec: Union[str, Path]) -> Path:
    """``hf:<folder>`` or ``<folder>`` -> the folder; one clear error when it is not a saved model."""
    s = str(spec)
    path = Path(s[3:] if s.startswith("hf:") else s)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a Hugging Face model folder (no config.json); give hf:<folder> "
                         f"written by save_pretrained")
    return path


def load_hf(spec, device="cpu"):
    """``(model, tokenizer)`` from a local folder, offline."""
    from kdlab.lm.models import HFCausalLM
    from kdlab.lm.tokenizers import HFTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = hf_folder(spec)
    tok = HFTokenizer(path)
    model = HFCausalLM(tok.vocab_size, path=str(path))
    return model.to(device), tok


def check_same_tokenizer(a, b) -> None:
    """Raise one clear ValueError when two HF tokenizers differ in vocabulary or special tokens."""
    if a.hf.get_vocab() != b.hf.get_vocab() or a.eos_id != b.eos_id or a.pad_id != b.pad_id:
        raise ValueError(f"the teacher's tokenizer ({a.path}) and the student's ({b.path}) differ; token-level "
                         f"distillation compares distributions id by id: give both models the same tokenizer")


def load_records(path) -> list[dict]:
    """The rows of a local data file (jsonl / json / txt / parquet) via ``datasets``, offline."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    path = Path(path)
    kind = DATA_KINDS.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"data file {path}: unknown type {path.suffix!r}; use one of {', '.join(DATA_KINDS)}")
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    try:
        import datasets
    except ImportError:
        raise ImportError("local data files need datasets: pip install 'kdlab[hf]'") from None
    ds = datasets.load_dataset(kind, data_files=str(path), split="train")
    return [dict(r) for r in ds]


def render_example(rec: dict, tok) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids) of one record; only the completion ids are trained on."""
    hf = tok.hf
    if "messages" in rec or ("prompt" in rec and "completion" in rec):
        msgs = rec.get("messages") or [{"role": "user", "content": rec["prompt"]},
                                       {"role": "assistant", "content": rec["completion"]}]
        if not msgs or msgs[-1].get("role") != "assistant":
            raise ValueError("a chat record's last message must be the assistant's (the completion to learn)")
        if hf.chat_template is None:
            raise ValueError(f"the tokenizer in {tok.path} has no chat_template; set one in its "
                             f"tokenizer_config.json or give text records")
        prompt = hf.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        full = hf.apply_chat_template(msgs, tokenize=False)
        if not full.startswith(prompt):
            raise ValueError("the chat template renders the conversation without its prompt as a prefix; "
                             "completion-only loss needs a prefix-stable template")
        p, c = tok.encode(prompt), tok.encode(full[len(prompt):])
        if not c or c[-1] != tok.eos_id:
            c = c + [tok.eos_id]
        return p, c
    if "text" in rec:
        ids = tok.encode(rec["text"]) + [tok.eos_id]
        return ids[:1], ids[1:]
    raise ValueError(f"record with keys {sorted(rec)}: give messages, prompt + completion, or text")


def encode_records(records: Sequence[dict], tok, max_len: int) -> list[tuple[list[int], list[int]]]:
    """Rendered (prompt, completion) id pairs, truncated to ``max_len`` tokens in all (prompt kept
    first; an example whose prompt alone fills ``max_len`` is dropped)."""
    out = []
    for r in records:
        p, c = render_example(r, tok)
        if len(p) >= max_len:
            continue
        out.append((p, c[: max_len + 1 - len(p)]))
    if not out:
        raise ValueError(f"no example fits max_len {max_len}; raise max_len")
    return out


def add_lora(model, lora: dict):
    """Wrap an :class:`HFCausalLM`'s model with a LoRA adapter (base frozen)."""
    try:
        import peft
    except ImportError:
        raise ImportError("a LoRA student needs peft: pip install 'kdlab[hf]'") from None
    cfg = peft.LoraConfig(r=int(lora.get("r", 8)), lora_alpha=int(lora.get("alpha", 16)),
                          lora_dropout=float(lora.get("dropout", 0.0)), target_modules=lora.get("target_modules"),
                          task_type="CAUSAL_LM")
    model.model = peft.get_peft_model(model.model, cfg)
    return model


def hf_train(student, data, out_dir, *, teacher=None, terms: Sequence = ({"term": "fkl"},), val_data=None,
             lora: Optional[dict] = None, hidden: Optional[dict] = None, epochs: int = 1,
             steps_per_epoch: Optional[int] = None, batch_size: int = 4, lr: float = 1e-3, max_len: int = 256,
             seed: int = 0, device: str = "cpu", log=print) -> dict:
    """Train an ``hf:<folder>`` student on a local data file, distilled from ``teacher`` (``hf:<folder>``;
    None: plain CE fine-tuning, ``terms`` then defaults to ``ce``), and write ``out_dir/hf`` and
    ``out_dir/student.pt`` (module doc). ``hidden``: ``{"loss": "cos"|"mse", "weight": w,
    "layers": [[s, t], ...] (default uniform)}``. ``val_data`` (default: ``data``) selects the
    best epoch. Returns the run's result with ``hf_dir`` and ``checkpoint``."""
    from kdlab.core.checkpoint import atomic_save, load_checkpoint, model_checkpoint
    from kdlab.lm.arithmetic import ProblemLoader
    from kdlab.lm.corpora import token_bytes_tensor
    from kdlab.lm.hidden import HiddenDistill
    from kdlab.lm.objective import LMObjective
    from kdlab.lm.recipe import LMTrainCfg
    from kdlab.lm.runs import fit

    out_dir = Path(out_dir)
    torch.manual_seed(derive_seed(seed, "lm-init"))
    s_model, tok = load_hf(student, device)
    t_model = None
    if teacher is not None:
        t_model, t_tok = load_hf(teacher, device)
        check_same_tokenizer(t_tok, tok)
    elif any((t if isinstance(t, str) else t.get("term")) != "ce" for t in terms) or hidden:
        raise ValueError("divergence terms and hidden-state distillation need a teacher (teacher=hf:<folder>)")
    if lora:
        add_lora(s_model, lora)
    hid = None
    if hidden:
        sc, tc = s_model.model.config, t_model.model.config
        hid = HiddenDistill(sc.num_hidden_layers, tc.num_hidden_layers, sc.hidden_size, tc.hidden_size,
                            loss=hidden.get("loss", "cos"), layers=hidden.get("layers")).to(device)
    pairs = encode_records(load_records(data), tok, max_len)
    vpairs = encode_records(load_records(val_data), tok, max_len) if val_data is not None else pairs
    meta = {"model_name": "lm:hf", "model_kwargs": {"path": str(hf_folder(student))},
            "num_classes": tok.vocab_size, "in_channels": 0, "dataset": f"lm:{Path(data).name}",
            "tokenizer": tok.to_dict()}
    obj = LMObjective(s_model, terms=terms if teacher is not None else ["ce"], teacher=t_model,
                      token_bytes=token_bytes_tensor(tok), pad_id=tok.pad_id, eos_id=tok.eos_id, seed=seed,
                      meta=meta, hidden=hid, hidden_weight=float((hidden or {}).get("weight", 1.0)))
    trainable = sum(p.numel() for p in obj.parameters())
    steps = steps_per_epoch or -(-len(pairs) // batch_size)
    train = ProblemLoader(pairs, batch_size, tok.pad_id, derive_seed(seed, "lm-data"), steps=steps)
    val = ProblemLoader(vpairs, batch_size, tok.pad_id, shuffle=False)
    t = LMTrainCfg(epochs=epochs, steps_per_epoch=steps, batch_size=batch_size, eval_batch_size=batch_size,
                   lr=lr, device=device, seed=seed, schedule="constant")
    res = fit(obj, train, val, None, t, out_dir, seed=seed, method="hf-distill" if teacher else "hf-train",
              identity={"kind": "hf", "student": str(student), "teacher": str(teacher), "data": str(data),
                        "terms": [dict(x) if isinstance(x, dict) else x for x in terms], "lora": lora,
                        "hidden": hidden, "epochs": epochs, "steps": steps, "lr": lr, "max_len": max_len})
    s_model.load_state_dict(load_checkpoint(out_dir / "best.pt")["model"])
    hf_dir = out_dir / "hf"
    model = s_model.model
    if lora:
        model.save_pretrained(str(out_dir / "adapter"))
        model = model.merge_and_unload()
        s_model.model = model
    model.save_pretrained(str(hf_dir))
    tok.hf.save_pretrained(str(hf_dir))
    meta.update(model_kwargs={"path": str(hf_dir)}, tokenizer={"kind": "hf", "path": str(hf_dir)})
    atomic_save(model_checkpoint(s_model, **meta), out_dir / "student.pt")
    log(f"hf: {hf_dir} (save_pretrained{', LoRA merged' if lora else ''}); kdlab checkpoint {out_dir / 'student.pt'}")
    return {**res, "hf_dir": str(hf_dir), "checkpoint": str(out_dir / "student.pt"),
            "trainable_params": trainable}


#: a minimal ChatML-style template (prefix-stable: the prompt with the generation prompt is a prefix
#: of the whole conversation), for tokenizers trained from scratch
CHATML = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def train_hf_tokenizer(texts: Sequence[str], folder, vocab_size: int = 300, chat_template: str = CHATML):
    """Train a byte-level BPE with ``tokenizers`` on ``texts`` and save it as a ``transformers``
    tokenizer (``<|end|>`` eos, ``<|pad|>`` pad, the chat roles as special tokens, ``chat_template``)
    into ``folder``; returns the folder. Offline; for tests and examples that build models from
    configs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(list(texts), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|end|>", pad_token="<|pad|>",
                                   additional_special_tokens=special[2:])
    fast.chat_template = chat_template
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    return folder


def init_hf_model(folder, tokenizer_folder, arch: str = "llama", seed: int = 0, **config) -> Path:
    """A randomly initialised ``gpt2`` or ``llama`` causal LM built with ``from_config`` for the
    tokenizer in ``tokenizer_folder``, saved with that tokenizer into ``folder`` (``save_pretrained``)."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_folder), local_files_only=True)
    ids = dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
               bos_token_id=tok.eos_token_id)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(**ids, **config)
    elif arch == "llama":
        cfg = transformers.LlamaConfig(**ids, tie_word_embeddings=config.pop("tie_word_embeddings", True), **config)
    else:
        raise ValueError(f"arch must be gpt2 or llama (got {arch!r})")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    folder = Path(folder)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder
