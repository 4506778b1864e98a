"""Training benchmark (`make bench`): peftune vs the HF Trainer, TRL and a bare loop, on the
real model.

The model is SmolLM2-135M-Instruct (the catalogue's `smollm2-135m-instruct`, pulled and
converted once; 30 layers, vocabulary 49,152) unless `--model` names another; `--quick` uses
a tiny random model instead (the smoke test, not a figure to quote). One LoRA config (r 16,
alpha 32, all linear layers), AdamW with the same lr, cosine schedule, warm-up and gradient
clipping, the same micro-batch (4 x 512 tokens) and number of optimizer steps, and the same
torch thread count in every system, each in its own process:

  peftune      `peftune train recipe.yaml` (packing on, its defaults: chunked loss, no mask
               where a row holds one example); figures from summary.json and metrics.jsonl.
  peftune+ckpt the same with `train.gradient_checkpointing: true`.
  peftune+nf4  the same over a 4-bit (nf4) base: the memory QLoRA saves on CPU.
  trainer      `transformers.Trainer` + peft over the same tokenized examples, each batch padded
               to its longest example (DataCollatorForSeq2Seq, labels -100 on padding).
  trl          TRL's SFTTrainer + peft with packing and its other defaults (gradient
               checkpointing on; bf16 autocast, as TRL sets it), in the `bench` extra.
  bare         peftune's own packed micro-batches and loss through `loss; backward; clip;
               step` and nothing else: the floor peftune's loop overhead is measured against.

Three data shapes, from the Python standard library (no downloads):

  mixed   plain text of mixed lengths (sources and the pydoc topics, 16..512 tokens each);
  masked  instruction data whose prompts are masked: "write this function's docstring"
          (the function's source) -> the docstring, as chat rows; only the answer is a target;
  full    rows longer than 512 tokens, cut to 512: nothing to pad, nothing to pack.

Effective throughput is real (non-padding) tokens per second of training, steady state (the
first `--warmup` steps discarded; model loading and data preparation excluded); peak RSS is
the process's. Targets (the ratios in TARGETS: e.g. tokens/s >= 2.5x the Trainer's on mixed
lengths, peak RSS <= 0.6x) are printed with the figures reached, met or not.

    python scripts/bench_train.py [--shapes mixed,masked,full] [--steps N] [--threads T]
                                  [--model PATH|NAME] [--quick] [--out FILE]

Exits 0 whenever the measurement completes, also when a target is missed; non-zero on errors.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import platform
import random
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import benchlib
import yaml
from benchlib import MiB

HERE = Path(__file__).resolve()
REAL_MODEL = "smollm2-135m-instruct"
SHAPES = ("mixed", "masked", "full")
SHAPE_TITLES = {"mixed": "(a) plain text of mixed lengths", "masked": "(b) instructions, prompts masked",
                "full": "(c) full-length rows (nothing to pad)"}
# The systems each shape runs (TRL and the checkpointing pair on the mixed text, where TRL
# packs; the 4-bit base on full rows, the heaviest activations).
SHAPE_SYSTEMS = {"mixed": ("peftune", "trainer", "bare", "peftune+ckpt", "trl"),
                 "masked": ("peftune", "trainer", "bare"),
                 "full": ("peftune", "trainer", "bare", "peftune+nf4")}
QUICK_SYSTEMS = ("peftune", "trainer", "bare")
LABELS = {"peftune": "peftune (packed)", "peftune+ckpt": "peftune + checkpointing",
          "peftune+nf4": "peftune, nf4 base", "trainer": "HF Trainer (padded)",
          "trl": "TRL SFT (packed, ckpt)", "bare": "bare loop (packed)"}
PEFTUNE_OVERRIDES = {"peftune": [], "peftune+ckpt": ["train.gradient_checkpointing=true"],
                     "peftune+nf4": ["quant.method=nf4"]}
FULL = dict(steps=5, batch_size=4, max_length=512)
QUICK = dict(steps=6, batch_size=2, max_length=128, hidden_size=32, layers=2, heads=4)
LORA = dict(r=16, alpha=32, dropout=0.0, target_modules="all-linear")
TRAIN = dict(lr=1.0e-4, scheduler="cosine", warmup_ratio=0.2, weight_decay=0.0,
             max_grad_norm=1.0, adam_betas=[0.9, 0.999], seed=0)
# name: (shape, numerator, denominator, measure, comparison, target)
TARGETS = {
    "full_tokens_per_s": ("full", "peftune", "trainer", "tokens_per_s", ">=", 1.0),
    "full_peak_rss": ("full", "peftune", "trainer", "peak_rss", "<=", 0.6),
    "mixed_tokens_per_s": ("mixed", "peftune", "trainer", "tokens_per_s", ">=", 2.5),
    "mixed_peak_rss": ("mixed", "peftune", "trainer", "peak_rss", "<=", 0.6),
    "masked_tokens_per_s": ("masked", "peftune", "trainer", "tokens_per_s", ">=", 2.5),
    "masked_peak_rss": ("masked", "peftune", "trainer", "peak_rss", "<=", 0.6),
    "ckpt_vs_trl_tokens_per_s": ("mixed", "peftune+ckpt", "trl", "tokens_per_s", ">=", 4.0),
    "ckpt_vs_trl_peak_rss": ("mixed", "peftune+ckpt", "trl", "peak_rss", "<=", 1.0),
    "mixed_loop_overhead": ("mixed", "peftune", "bare", "overhead", "<=", 0.05),
    "masked_loop_overhead": ("masked", "peftune", "bare", "overhead", "<=", 0.05),
    "full_loop_overhead": ("full", "peftune", "bare", "overhead", "<=", 0.05),
}


# --------------------------------------------------------------------------- data


def _stdlib_texts() -> list[str]:
    """The stdlib's top-level sources, then the pydoc topics (English prose), in a fixed order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))]
    from pydoc_data.topics import topics

    texts.extend(topics[key] for key in sorted(topics))
    return texts


def build_text(path: Path, tokenizer, *, tokens: int, low: int, high: int, seed: int) -> None:
    """JSONL {"text": ...} of spans of the stdlib's text, each `low..high` tokens long
    (log-uniform), until about `tokens` tokens."""
    rng = random.Random(seed)
    rows, total = [], 0
    for text in _stdlib_texts():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        pos = 0
        while pos < len(ids) and total < tokens:
            size = low if low == high else round(math.exp(rng.uniform(math.log(low), math.log(high))))
            span = ids[pos:pos + size]
            pos += size
            if len(span) >= (low if low == high else 16):  # a file's short tail is left out
                piece = tokenizer.decode(span)
                if piece.strip():
                    rows.append(json.dumps({"text": piece}))
                    total += len(span)
        if total >= tokens:
            break
    path.write_text("\n".join(rows) + "\n")


def build_docstring_task(path: Path, *, rows: int, max_chars: int, seed: int) -> None:
    """JSONL chat rows: the user gives a stdlib function's source without its docstring, the
    assistant answers with the docstring. Prompts are masked in training."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for file in sorted(stdlib.glob("*.py")):
        source = file.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc or len(doc) < 40:
                continue
            body = ast.get_source_segment(source, node) or ""
            first = node.body[0]
            doc_text = ast.get_source_segment(source, first) or ""
            code = body.replace(doc_text, "", 1)
            if 0 < len(code) + len(doc) <= max_chars:
                found.append((code, doc))
    random.Random(seed).shuffle(found)
    lines = [json.dumps({"messages": [
        {"role": "user", "content": f"Write the docstring of this function:\n\n{code}"},
        {"role": "assistant", "content": doc}]}) for code, doc in found[:rows]]
    path.write_text("\n".join(lines) + "\n")


def write_recipe(path: Path, *, model: str, data: Path, out: Path, shape: str, steps: int,
                 batch_size: int, max_length: int, log_every: int) -> None:
    data_section = ({"format": "chat", "messages_field": "messages"} if shape == "masked"
                    else {"format": "text", "text_field": "text"})
    recipe = {
        "model": {"path": model, "dtype": "float32"},
        "quant": {"method": "none"},
        "adapter": {"method": "lora", **LORA},
        "data": {"train": str(data), **data_section, "max_length": max_length, "packing": True},
        "train": {"max_steps": steps, "batch_size": batch_size, "grad_accum": 1,
                  "optimizer": "adamw", "precision": "fp32", "log_every": log_every,
                  "eval_every": None, "save_every": None, **TRAIN},
        "output": {"dir": str(out)},
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))


def data_summary(recipe_path: Path) -> dict:
    """Tokenize once (fills the shared cache, so no run pays for it) and describe the data."""
    import numpy as np

    from peftune.data import build_datasets, pack_rows, packing_efficiency
    from peftune.models import load_tokenizer, resolve_model_path
    from peftune.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    tokenizer = load_tokenizer(resolve_model_path(recipe.model.path))
    train = build_datasets(recipe.data, tokenizer, seed=recipe.train.seed).train
    rows = pack_rows(train, max_length=recipe.data.max_length, packing=True, seed=recipe.train.seed)
    lengths = train.lengths
    targets = sum(int((train[i][1] != -100).sum()) for i in range(len(train)))
    return {"examples": len(train), "tokens": int(lengths.sum()), "target_tokens": targets,
            "packed_rows": len(rows),
            "packing_fill": round(packing_efficiency(rows, recipe.data.max_length), 4),
            "length_min": int(lengths.min()), "length_median": float(np.median(lengths)),
            "length_max": int(lengths.max())}


# --------------------------------------------------------------------------- workers


def _model_path(recipe) -> str:
    from peftune.models import resolve_model_path

    return str(resolve_model_path(recipe.model.path))


def _lora_config(recipe):
    from peft import LoraConfig

    a = recipe.adapter
    return LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout,
                      target_modules=a.target_modules, task_type="CAUSAL_LM")


def _load_model(recipe, *, with_lora: bool = True):
    """The base model (and its LoRA), seeded as peftune seeds them."""
    import torch
    from accelerate.utils import set_seed
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    set_seed(recipe.train.seed)
    model = AutoModelForCausalLM.from_pretrained(
        _model_path(recipe), dtype=torch.float32, attn_implementation="sdpa", use_safetensors=True)
    model.config.use_cache = False
    return get_peft_model(model, _lora_config(recipe)) if with_lora else model


def _steady(marks: dict[int, tuple[float, int]], warmup: int, steps: int) -> dict:
    """Throughput between the end of step `warmup` and the end of step `steps`."""
    (t0, n0), (t1, n1) = marks[warmup], marks[steps]
    return {"steady_steps": steps - warmup, "steady_tokens": n1 - n0,
            "steady_seconds": t1 - t0, "steady_tokens_per_s": (n1 - n0) / (t1 - t0)}


def _tokenized(recipe):
    from peftune.data import build_datasets
    from peftune.models import load_tokenizer

    tokenizer = load_tokenizer(_model_path(recipe))
    return tokenizer, build_datasets(recipe.data, tokenizer, seed=recipe.train.seed).train


def worker_bare(recipe, cfg: dict) -> dict:
    """peftune's packed micro-batches and loss through the plainest loop there is."""
    import torch
    from transformers import get_scheduler

    from peftune.data import micro_batches, pack_rows
    from peftune.train.loss import token_loss_sum

    steps, warmup, t = recipe.train.max_steps, cfg["warmup"], recipe.train
    tokenizer, train = _tokenized(recipe)  # data first, then the seeded model (as peftune)
    rows = pack_rows(train, max_length=recipe.data.max_length, packing=True, seed=t.seed)
    model = _load_model(recipe)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas),
                                  weight_decay=t.weight_decay)
    scheduler = get_scheduler("cosine", optimizer, num_training_steps=steps,
                              num_warmup_steps=int(t.warmup_ratio * steps))
    epochs, epoch = [], 0  # the per-epoch sequences in order, as peftune's loop takes them
    while sum(len(e) for e in epochs) < steps:
        epochs.append(micro_batches(rows, batch_size=t.batch_size, seed=t.seed, epoch=epoch,
                                    pad_id=tokenizer.pad_token_id, packing=True))
        epoch += 1
    batches = [(sequence, i) for sequence in epochs for i in range(len(sequence))][:steps]

    model.train()
    losses, marks, tokens, padded = [], {}, 0, 0
    marks[0] = (time.perf_counter(), 0)
    for step, (sequence, i) in enumerate(batches, 1):
        batch = sequence[i]
        targets = int((batch["labels"][:, 1:] != -100).sum())
        loss = token_loss_sum(model, batch) / targets
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        tokens += int(batch["num_tokens"])
        padded += batch["input_ids"].numel()
        marks[step] = (time.perf_counter(), tokens)
    seconds = marks[steps][0] - marks[0][0]
    return {"steps": steps, "tokens": tokens, "padded_tokens": padded, "train_seconds": seconds,
            "tokens_per_s": tokens / seconds, **_steady(marks, warmup, steps),
            "losses": losses, "peak_rss_bytes": benchlib.peak_rss_bytes()}


def _clocked(trainer_class, counts: dict, marks: dict):
    """`trainer_class` counting real tokens per step (attention mask, else every token)."""
    from transformers import TrainerCallback

    class Counting(trainer_class):
        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs.get("attention_mask")
            real = int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
            counts["tokens"] += real
            counts["padded"] += inputs["input_ids"].numel()
            return super().training_step(model, inputs, num_items_in_batch)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks[state.global_step] = (time.perf_counter(), counts["tokens"])

    return Counting, Clock()


def _trainer_args(recipe, cfg: dict, **extra) -> dict:
    t, steps = recipe.train, recipe.train.max_steps
    return dict(
        output_dir=cfg["trainer_dir"], max_steps=steps, per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=1, learning_rate=t.lr, lr_scheduler_type="cosine",
        warmup_steps=int(t.warmup_ratio * steps), weight_decay=t.weight_decay,
        adam_beta1=t.adam_betas[0], adam_beta2=t.adam_betas[1], optim="adamw_torch",
        max_grad_norm=t.max_grad_norm, seed=t.seed, data_seed=t.seed, use_cpu=True,
        eval_strategy="no", save_strategy="no", logging_strategy="steps", logging_steps=steps,
        report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        dataloader_pin_memory=False, **extra)


def _finish(trainer, counts: dict, marks: dict, warmup: int, steps: int, extra: dict) -> dict:
    start = time.perf_counter()
    marks[0] = (start, 0)
    output = trainer.train()
    seconds = marks[steps][0] - start
    return {"steps": trainer.state.global_step, "tokens": counts["tokens"],
            "padded_tokens": counts["padded"], "train_seconds": seconds,
            "tokens_per_s": counts["tokens"] / seconds, **_steady(marks, warmup, steps),
            "final_loss": output.training_loss, "peak_rss_bytes": benchlib.peak_rss_bytes(),
            **extra}


def worker_trainer(recipe, cfg: dict) -> dict:
    """transformers.Trainer + peft over the same tokenized examples, padded per batch."""
    import datasets
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tokenizer, train = _tokenized(recipe)  # truncated and masked as peftune does
    dataset = datasets.Dataset.from_dict({
        "input_ids": [train[i][0].tolist() for i in range(len(train))],
        "labels": [train[i][1].tolist() for i in range(len(train))],
    })
    model = _load_model(recipe)
    counts, marks = {"tokens": 0, "padded": 0}, {}
    trainer_class, clock = _clocked(Trainer, counts, marks)
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    trainer = trainer_class(model=model, args=TrainingArguments(**_trainer_args(recipe, cfg)),
                            train_dataset=dataset, data_collator=collator, callbacks=[clock])
    return _finish(trainer, counts, marks, cfg["warmup"], recipe.train.max_steps,
                   {"precision": "fp32", "gradient_checkpointing": False})


def worker_trl(recipe, cfg: dict) -> dict:
    """TRL's SFTTrainer + peft, packing on, its other defaults (gradient checkpointing, bf16)."""
    import datasets
    from trl import SFTConfig, SFTTrainer

    from peftune.models import load_tokenizer

    rows = [json.loads(line) for line in Path(recipe.data.train).read_text().splitlines() if line]
    if recipe.data.format == "chat":  # prompt-completion rows: TRL masks the prompt
        dataset = datasets.Dataset.from_list([{"prompt": r["messages"][:-1],
                                               "completion": r["messages"][-1:]} for r in rows])
    else:
        dataset = datasets.Dataset.from_list([{"text": r["text"]} for r in rows])
    tokenizer = load_tokenizer(_model_path(recipe))
    model = _load_model(recipe, with_lora=False)
    counts, marks = {"tokens": 0, "padded": 0}, {}
    trainer_class, clock = _clocked(SFTTrainer, counts, marks)
    config = SFTConfig(**_trainer_args(recipe, cfg), packing=True,
                       max_length=recipe.data.max_length)
    trainer = trainer_class(model=model, args=config, train_dataset=dataset,
                            processing_class=tokenizer, peft_config=_lora_config(recipe),
                            callbacks=[clock])
    return _finish(trainer, counts, marks, cfg["warmup"], recipe.train.max_steps,
                   {"precision": "bf16" if config.bf16 else "fp32",
                    "gradient_checkpointing": bool(config.gradient_checkpointing)})


WORKERS = {"bare": worker_bare, "trainer": worker_trainer, "trl": worker_trl}


def run_worker(kind: str, config_path: Path, result_path: Path) -> int:
    import torch

    from peftune.recipe import load_recipe

    cfg = json.loads(config_path.read_text())
    torch.set_num_threads(cfg["threads"])
    result = WORKERS[kind](load_recipe(cfg["recipe"]), cfg)
    result["torch_threads"] = torch.get_num_threads()
    result_path.write_text(json.dumps(result))
    return 0


# --------------------------------------------------------------------------- running


def peftune_result(run_dir: Path, warmup: int, steps: int) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    train = {r["step"]: r for r in records if "loss" in r}
    marks = {s: (r["elapsed_s"], r["tokens"]) for s, r in train.items()}
    marks[0] = (0.0, 0)
    return {"steps": summary["steps"], "tokens": summary["tokens"],
            "train_seconds": summary["train_seconds"], "tokens_per_s": summary["tokens_per_s"],
            **_steady(marks, warmup, steps), "setup_seconds": summary["setup_seconds"],
            "peak_rss_bytes": summary["peak_rss_bytes"], "final_loss": summary["final_loss"],
            "logged": {s: r["loss"] for s, r in sorted(train.items())}}


def peftune_env(env: dict) -> dict:
    """`env` as the `peftune` command would run its training process in it."""
    from peftune.allocator import find_jemalloc, reexec_env

    return reexec_env(["peftune", "train"], env, library=find_jemalloc()) or env


def run_shape(shape: str, systems: tuple[str, ...], *, work: Path, env: dict, recipe: Path,
              cfg: dict) -> dict:
    config = work / f"{shape}-config.json"
    config.write_text(json.dumps(cfg))
    results = {}
    for system in systems:
        if system in PEFTUNE_OVERRIDES:
            out = work / f"{shape}-{system}"
            command = [sys.executable, "-m", "peftune.cli", "train", str(recipe), "--overwrite",
                       f"output.dir={out}", *PEFTUNE_OVERRIDES[system]]
        else:
            out = work / f"{shape}-{system}.json"
            command = [sys.executable, str(HERE), "--worker", system, "--config", str(config),
                       "--result", str(out)]
        # peftune's runs get the allocator the `peftune` command gives them (jemalloc where
        # installed, peftune/allocator.py), and so does the bare loop (peftune's batches: it
        # measures the loop's overhead); the Trainer and TRL run as their users run them
        own_env = peftune_env(env) if system in (*PEFTUNE_OVERRIDES, "bare") else env
        wall = benchlib.run_child(f"{shape}: {system}", command, env=own_env,
                                  log=work / f"{shape}-{system}.log").wall_seconds
        result = (peftune_result(out, cfg["warmup"], cfg["steps"]) if system in PEFTUNE_OVERRIDES
                  else json.loads(out.read_text()))
        result["wall_seconds"] = wall
        result["allocator"] = "jemalloc" if "jemalloc" in own_env.get("LD_PRELOAD", "") else "system"
        if "padded_tokens" in result:
            result["fill"] = result["tokens"] / result["padded_tokens"]
        results[system] = result
    if "bare" in results:  # peftune's batches are the bare loop's
        for system in PEFTUNE_OVERRIDES:
            if system in results:
                results[system]["fill"] = results["bare"]["fill"]
    return results


def ratios(report: dict) -> dict:
    out = {}
    for name, (shape, num, den, measure, op, target) in TARGETS.items():
        systems = report["shapes"].get(shape, {}).get("systems", {})
        if num not in systems or den not in systems:
            continue
        a, b = systems[num], systems[den]
        if measure == "tokens_per_s":
            value = a["steady_tokens_per_s"] / b["steady_tokens_per_s"]
            what = f"{shape}: {num} / {den} tokens/s"
        elif measure == "peak_rss":
            value = a["peak_rss_bytes"] / b["peak_rss_bytes"]
            what = f"{shape}: {num} / {den} peak RSS"
        else:
            value = 1 - a["steady_tokens_per_s"] / b["steady_tokens_per_s"]
            what = f"{shape}: peftune loop overhead vs bare"
        shown = f"{target:.0%}" if measure == "overhead" else f"{target:g}x"
        out[name] = {**benchlib.verdict(what, value, op, target), "target_shown": f"{op} {shown}"}
    return out


def qlora_check(report: dict) -> dict | None:
    """The nf4 base's peak RSS against the fp32 base's minus half the weight savings."""
    systems = report["shapes"].get("full", {}).get("systems", {})
    if "peftune+nf4" not in systems or "peftune" not in systems:
        return None
    saved = report["model"]["linear_weight_bytes_fp32"] - report["model"]["linear_weight_bytes_nf4"]
    fp32, nf4 = systems["peftune"]["peak_rss_bytes"], systems["peftune+nf4"]["peak_rss_bytes"]
    return {"fp32_peak_rss_bytes": fp32, "nf4_peak_rss_bytes": nf4, "weight_savings_bytes": saved,
            "target_bytes": fp32 - saved / 2, "pass": nf4 <= fp32 - saved / 2}


def loss_check(peftune: dict, bare: dict) -> dict:
    """peftune and the bare loop train on the same batches from the same start: their logged
    window losses agree to float precision (the comparison is like for like)."""
    diffs, previous = [], 0
    for step, loss in peftune["logged"].items():
        window = bare["losses"][previous:step]
        diffs.append(abs(loss - sum(window) / len(window)))
        previous = step
    return {"same_real_tokens": peftune["tokens"] == bare["tokens"],
            "max_abs_loss_diff": max(diffs) if diffs else None}


def model_facts(path: str) -> dict:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv = h // config.num_attention_heads * getattr(config, "num_key_value_heads", config.num_attention_heads)
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * i)  # q, o; k, v; gate, up, down
    return {"architecture": config.architectures[0] if config.architectures else config.model_type,
            "layers": layers, "hidden_size": h, "vocab_size": config.vocab_size,
            "linear_params": linear, "linear_weight_bytes_fp32": 4 * linear,
            # nf4: 4 bits a weight plus one fp32 absmax per block of 64
            "linear_weight_bytes_nf4": linear // 2 + 4 * (linear // 64)}


def print_report(report: dict) -> None:
    cfg, model = report["config"], report["model"]
    print()
    print(f"model: {cfg['model']} ({model['architecture']}, {model['layers']} layers, hidden "
          f"{model['hidden_size']}, vocabulary {model['vocab_size']:,}); LoRA r {LORA['r']} alpha "
          f"{LORA['alpha']} all-linear; fp32 unless noted; torch threads {cfg['threads']}")
    print(f"each system: {cfg['steps']} optimizer steps of micro-batch {cfg['batch_size']} x "
          f"{cfg['max_length']} tokens; the first {cfg['warmup']} discarded from 'steady tok/s' "
          "(the figure ratios use)")
    header = (f"{'system':<36}{'real tokens':>12}{'fill':>7}{'train s':>9}{'tok/s':>8}"
              f"{'steady tok/s':>14}{'peak RSS MiB':>14}")
    for shape, block in report["shapes"].items():
        d = block["data"]
        print(f"\n{SHAPE_TITLES[shape]}: {d['examples']:,} examples, {d['tokens']:,} tokens "
              f"({d['target_tokens']:,} targets), lengths {d['length_min']}..{d['length_max']} "
              f"(median {d['length_median']:g})")
        print(header)
        print("-" * len(header))
        for name, s in block["systems"].items():
            fill = f"{s['fill']:.0%}" if s.get("fill") is not None else "-"
            label = LABELS[name] + (" bf16" if s.get("precision") == "bf16" else "") + (
                ", jemalloc" if s.get("allocator") == "jemalloc" else "")
            print(f"{label:<36}{s['tokens']:>12,}{fill:>7}{s['train_seconds']:>9.1f}"
                  f"{s['tokens_per_s']:>8,.0f}{s['steady_tokens_per_s']:>14,.1f}"
                  f"{s['peak_rss_bytes'] / MiB:>14,.0f}")
        if "check" in block:
            c = block["check"]
            print(f"check: peftune and the bare loop saw the same real tokens: "
                  f"{c['same_real_tokens']}; max |loss difference| {c['max_abs_loss_diff']:.2e}")
    print()
    for item in report["ratios"].values():
        value = item["value"]
        shown = f"{value:.1%}" if "overhead" in item["what"] else f"{value:.2f}x"
        print(benchlib.verdict_line(item, width=44, value=f"{shown:>8}",
                                    target=f"{item['target_shown']:<7}", missed="MISS"))
    q = report.get("qlora")
    if q:
        print(f"QLoRA on CPU: nf4 base peak {q['nf4_peak_rss_bytes'] / MiB:,.0f} MiB vs fp32 base "
              f"{q['fp32_peak_rss_bytes'] / MiB:,.0f} MiB (4-bit weights save "
              f"{q['weight_savings_bytes'] / MiB:,.0f} MiB; target <= "
              f"{q['target_bytes'] / MiB:,.0f} MiB) "
              f"{benchlib.verdict_word(q['pass'], missed='MISS')}")
    note = benchlib.busy_note(report["environment"]["load_average_1min"],
                              limit=cfg["threads"] + 0.5)
    if note:
        print(f"note: {note}")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=None,
                        help="comma-separated data shapes: mixed, masked, full (default: all; "
                             "mixed with --quick)")
    parser.add_argument("--systems", default=None,
                        help="comma-separated systems to run where a shape has them (default: all)")
    parser.add_argument("--steps", type=int, help="optimizer steps (default 5; 6 with --quick)")
    parser.add_argument("--batch-size", type=int, help="micro-batch size (default 4)")
    parser.add_argument("--max-length", type=int, help="tokens per row (default 512)")
    parser.add_argument("--warmup", type=int, help="first steps left out of steady figures (default 1)")
    parser.add_argument("--threads", type=int,
                        help="torch threads in every system (default: torch's; 1 with --quick)")
    parser.add_argument("--model", default=None,
                        help=f"model path or catalogue name (default {REAL_MODEL})")
    parser.add_argument("--quick", action="store_true", help="a tiny random model: the smoke test")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/bench_train.json"))
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--worker", choices=tuple(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(args.worker, args.config, args.result)

    began = time.perf_counter()
    sizes = dict(QUICK if args.quick else FULL)
    steps = args.steps or sizes["steps"]
    batch_size = args.batch_size or sizes["batch_size"]
    max_length = args.max_length or sizes["max_length"]
    warmup = args.warmup if args.warmup is not None else 1
    shapes = (args.shapes or ("mixed" if args.quick else ",".join(SHAPES))).split(",")
    if unknown := [s for s in shapes if s not in SHAPES]:
        parser.error(f"--shapes: unknown {', '.join(unknown)}; choose from {', '.join(SHAPES)}")
    chosen = set(args.systems.split(",")) if args.systems else None
    if not 0 < warmup < steps:
        parser.error(f"--warmup must be in [1, steps); got {warmup} with --steps {steps}")

    import torch

    from peftune.models import build_tiny_model, load_tokenizer, resolve_model_path

    threads = args.threads or (1 if args.quick else torch.get_num_threads())
    work = Path(tempfile.mkdtemp(prefix="peftune-bench-"))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if args.quick:  # the tiny model's data cache is thrown away; the real model's is the user's
        env["PEFTUNE_CACHE"] = str(work / "cache")
    os.environ.update({k: env[k] for k in ("PEFTUNE_CACHE", "HF_HUB_OFFLINE") if k in env})
    report: dict = {"shapes": {}}
    loads: list[float] = []
    try:
        print(f"peftune training benchmark in {work}", flush=True)
        if args.quick:
            model = str(build_tiny_model(work / "model", hidden_size=sizes["hidden_size"],
                                         layers=sizes["layers"], heads=sizes["heads"], seed=0))
        else:
            model = args.model or REAL_MODEL
        model_dir = str(resolve_model_path(model))  # a catalogue model is pulled here, once
        tokenizer = load_tokenizer(model_dir)
        report["model"] = model_facts(model_dir)
        trl_missing = benchlib.missing_modules(["trl"])
        for shape in shapes:
            data = work / f"{shape}.jsonl"
            need = int(1.5 * steps * batch_size * max_length) + 4096
            if shape == "mixed":
                build_text(data, tokenizer, tokens=need, low=16, high=max_length, seed=0)
            elif shape == "full":
                build_text(data, tokenizer, tokens=need * 2, low=max_length + 64,
                           high=max_length + 64, seed=0)
            else:
                sample = Path(sysconfig.get_paths()["stdlib"], "typing.py").read_text()[:20000]
                chars_per_token = len(sample) / len(tokenizer(sample)["input_ids"])
                build_docstring_task(data, rows=6 * steps * batch_size + 64,
                                     max_chars=int(0.9 * max_length * chars_per_token), seed=0)
            recipe = work / f"{shape}.yaml"
            write_recipe(recipe, model=model, data=data, out=work / f"{shape}-peftune",
                         shape=shape, steps=steps, batch_size=batch_size, max_length=max_length,
                         log_every=warmup)
            systems = QUICK_SYSTEMS if args.quick and chosen is None else SHAPE_SYSTEMS[shape]
            systems = tuple(s for s in systems if chosen is None or s in chosen)
            if "trl" in systems and trl_missing:
                print(f"  {shape}: trl skipped (trl is not installed; pip install -e '.[bench]')")
                systems = tuple(s for s in systems if s != "trl")
            cfg = {"recipe": str(recipe), "threads": threads, "warmup": warmup, "steps": steps,
                   "trainer_dir": str(work / f"{shape}-trainer-run")}
            block = {"data": data_summary(recipe)}
            block["systems"] = run_shape(shape, systems, work=work, env=env, recipe=recipe, cfg=cfg)
            loads.append(benchlib.load_average())
            if "bare" in block["systems"] and "peftune" in block["systems"]:
                block["check"] = loss_check(block["systems"]["peftune"], block["systems"]["bare"])
            report["shapes"][shape] = block
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    report["config"] = {"model": "tiny random llama" if args.quick else model, "steps": steps,
                        "batch_size": batch_size, "max_length": max_length, "warmup": warmup,
                        "threads": threads, "quick": args.quick, "lora": LORA, "train": TRAIN}
    report["ratios"] = ratios(report)
    report["qlora"] = qlora_check(report)
    report["environment"] = {
        "python": platform.python_version(), "torch": torch.__version__,
        **{name: benchlib.package_version(name) for name in ("transformers", "peft", "trl")},
        "cpu_count": os.cpu_count(), "load_average_1min": loads}
    report["elapsed_seconds"] = time.perf_counter() - began
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out} ({report['elapsed_seconds']:.0f}s in all)")
    return 0


if __name__ == "__main__":
    benchlib.run_main(main)
