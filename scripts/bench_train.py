"""Training throughput benchmark (`make bench`): peftune vs Hugging Face Trainer vs a bare loop.

One tiny Llama-style model, one variable-length corpus (chunks of the Python standard
library's own sources, lengths spread log-uniformly over ~16..max_length byte-tokens), one
LoRA config (r 16, alpha 32, all-linear), AdamW with the same lr, cosine schedule, warm-up and
gradient clipping, fp32, the same micro-batch size and the same number of optimizer steps,
each system in its own process with the same torch thread count:

  peftune  `python -m peftune.cli train recipe.yaml --overwrite` (packing on); figures from
           its summary.json and metrics.jsonl.
  trainer  `transformers.Trainer` + peft LoRA over the same tokenized examples, each batch
           padded to its longest example (DataCollatorForSeq2Seq, labels -100 on padding).
  bare     the same packed micro-batches peftune builds (build_datasets, pack_rows,
           micro_batches), through `loss = model(...).loss; backward; clip; step` and nothing
           else: the floor that peftune's loop overhead is measured against.

Packing vs padding is the point of the comparison, so each system sees its own number of
examples per step, and the fair measure is effective throughput: real (non-padding) tokens
per second of training time (model loading and data preparation excluded). The first
`--warmup` steps of every system are discarded from the steady-state figures that the
targets are checked on; whole-run figures are reported beside them. Each system runs
`--repeats` times, interleaved, and its fastest run counts: on a shared machine, noise only
ever slows a run down.

    python scripts/bench_train.py [--steps N] [--batch-size B] [--threads T] [--repeats R]
                                  [--quick] [--out FILE]

Exits 0 whenever the measurement completes, also when a target is missed; non-zero on errors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve()
MiB = 1 << 20
SYSTEMS = ("peftune", "trainer", "bare")
LABELS = {"peftune": "peftune (packed)", "trainer": "HF Trainer (padded)",
          "bare": "bare loop (packed)"}
TARGETS = {  # name: (description, comparison, target)
    "peftune_vs_trainer_tokens_per_s": ("peftune / Trainer effective tokens/s", ">=", 1.5),
    "peftune_vs_trainer_peak_rss": ("peftune / Trainer peak RSS", "<=", 1.0),
    "loop_overhead_vs_bare": ("peftune loop overhead vs bare loop", "<=", 0.10),
}
FULL = dict(hidden_size=128, layers=4, heads=4, steps=100, batch_size=8, max_length=512)
QUICK = dict(hidden_size=32, layers=2, heads=4, steps=6, batch_size=2, max_length=128)
LORA = dict(r=16, alpha=32, dropout=0.0, target_modules="all-linear")
TRAIN = dict(lr=1.0e-3, scheduler="cosine", warmup_ratio=0.05, weight_decay=0.0,
             max_grad_norm=1.0, adam_betas=[0.9, 0.999], seed=0)


# --------------------------------------------------------------------------- set-up


def build_corpus(path: Path, *, tokens: int, max_length: int, seed: int) -> None:
    """JSONL of {"text": chunk} cut from the stdlib's sources, chunk lengths log-uniform in
    [16, max_length] byte-tokens (BOS and EOS included), until about `tokens` tokens."""
    rng = random.Random(seed)
    low, high = math.log(14), math.log(max_length - 2)
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    rows, total = [], 0
    for file in files:
        text = file.read_text(encoding="utf-8", errors="replace")
        pos = 0
        while pos < len(text) and total < tokens:
            size = round(math.exp(rng.uniform(low, high)))
            chunk = text[pos:pos + size]
            pos += size
            if len(chunk) >= 14 and chunk.strip():  # a file's short tail is left out
                rows.append(json.dumps({"text": chunk}))
                total += len(chunk.encode()) + 2
        if total >= tokens:
            break
    path.write_text("\n".join(rows) + "\n")


def write_recipe(path: Path, *, model: Path, data: Path, out: Path, steps: int,
                 batch_size: int, max_length: int, log_every: int) -> None:
    recipe = {
        "model": {"path": str(model), "dtype": "float32"},
        "quant": {"method": "none"},
        "adapter": {"method": "lora", **LORA},
        "data": {"train": str(data), "format": "text", "text_field": "text",
                 "max_length": max_length, "packing": True},
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
    from peftune.models import load_tokenizer
    from peftune.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    tokenizer = load_tokenizer(recipe.model.path)
    train = build_datasets(recipe.data, tokenizer, seed=recipe.train.seed).train
    rows = pack_rows(train, max_length=recipe.data.max_length, packing=True,
                     seed=recipe.train.seed)
    lengths = train.lengths
    return {"examples": len(train), "tokens": int(lengths.sum()), "packed_rows": len(rows),
            "packing_fill": round(packing_efficiency(rows, recipe.data.max_length), 4),
            "length_min": int(lengths.min()), "length_median": float(np.median(lengths)),
            "length_mean": round(float(lengths.mean()), 1), "length_max": int(lengths.max())}


# --------------------------------------------------------------------------- workers


def _peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _load_model_with_lora(recipe):
    """The base model and its LoRA, as peftune builds them (seeded the same way, so the
    LoRA matrices start identical in every system)."""
    import torch
    from accelerate.utils import set_seed
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    set_seed(recipe.train.seed)
    model = AutoModelForCausalLM.from_pretrained(
        recipe.model.path, dtype=torch.float32, attn_implementation="sdpa", use_safetensors=True)
    model.config.use_cache = False
    a = recipe.adapter
    config = LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout,
                        target_modules=a.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _steady(marks: dict[int, tuple[float, int]], warmup: int, steps: int) -> dict:
    """Throughput between the end of step `warmup` and the end of step `steps`."""
    (t0, n0), (t1, n1) = marks[warmup], marks[steps]
    return {"steady_steps": steps - warmup, "steady_tokens": n1 - n0,
            "steady_seconds": t1 - t0, "steady_tokens_per_s": (n1 - n0) / (t1 - t0)}


def _lazy(sequence):
    """One thunk per micro-batch: tensors are built when the loop reaches the batch."""
    return [lambda i=i: sequence[i] for i in range(len(sequence))]


def worker_bare(recipe, cfg: dict) -> dict:
    """The same packed micro-batches as peftune through the plainest loop there is."""
    import torch
    from transformers import get_scheduler

    from peftune.data import block_causal_mask, build_datasets, micro_batches, pack_rows
    from peftune.models import load_tokenizer

    steps, warmup = recipe.train.max_steps, cfg["warmup"]
    tokenizer = load_tokenizer(recipe.model.path)
    # As peftune/train/setup.py: data first, then the seeded model and adapter.
    splits = build_datasets(recipe.data, tokenizer, seed=recipe.train.seed)
    rows = pack_rows(splits.train, max_length=recipe.data.max_length, packing=True,
                     seed=recipe.train.seed)
    model = _load_model_with_lora(recipe)
    params = [p for p in model.parameters() if p.requires_grad]
    t = recipe.train
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas),
                                  weight_decay=t.weight_decay)
    scheduler = get_scheduler("cosine", optimizer, num_training_steps=steps,
                              num_warmup_steps=int(t.warmup_ratio * steps))
    epochs, epoch = [], 0  # lazy per-epoch sequences, in order, as peftune's loop takes them
    while sum(len(e) for e in epochs) < steps:
        epochs.append(micro_batches(rows, batch_size=t.batch_size, seed=t.seed, epoch=epoch,
                                    pad_id=tokenizer.pad_token_id, packing=True))
        epoch += 1
    batches = [batch for sequence in epochs for batch in _lazy(sequence)][:steps]

    model.train()
    losses, marks, tokens = [], {}, 0
    start = time.perf_counter()
    marks[0] = (start, 0)
    for step, batch in enumerate(batches, 1):
        batch = batch()
        # the same model inputs as peftune's: packed rows with their block-causal mask
        loss = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                     attention_mask=block_causal_mask(batch["position_ids"]),
                     labels=batch["labels"], use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        tokens += int(batch["num_tokens"])
        marks[step] = (time.perf_counter(), tokens)
    seconds = marks[steps][0] - start
    bos = tokenizer.bos_token_id
    return {
        "steps": steps, "tokens": tokens, "train_seconds": seconds,
        "tokens_per_s": tokens / seconds, **_steady(marks, warmup, steps),
        "padded_tokens": sum(b()["input_ids"].numel() for b in batches),
        "examples": sum(int((b()["input_ids"] == bos).sum()) for b in batches),
        "losses": [float(x) for x in losses], "peak_rss_bytes": _peak_rss_bytes(),
    }


def worker_trainer(recipe, cfg: dict) -> dict:
    """transformers.Trainer over the same tokenized examples, padded per batch."""
    import datasets
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    from peftune.data import build_datasets
    from peftune.models import load_tokenizer

    steps, warmup, t = recipe.train.max_steps, cfg["warmup"], recipe.train
    tokenizer = load_tokenizer(recipe.model.path)
    train = build_datasets(recipe.data, tokenizer, seed=t.seed).train  # truncated already
    dataset = datasets.Dataset.from_dict({
        "input_ids": [train[i][0].tolist() for i in range(len(train))],
        "labels": [train[i][1].tolist() for i in range(len(train))],
    })
    model = _load_model_with_lora(recipe)
    bos = tokenizer.bos_token_id
    counts = {"tokens": 0, "padded": 0, "examples": 0}
    marks: dict[int, tuple[float, int]] = {}

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            mask = inputs["attention_mask"]
            counts["tokens"] += int(mask.sum())
            counts["padded"] += mask.numel()
            counts["examples"] += int((inputs["input_ids"] == bos).sum())
            return super().training_step(model, inputs, num_items_in_batch)

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks[state.global_step] = (time.perf_counter(), counts["tokens"])

    args = TrainingArguments(
        output_dir=cfg["trainer_dir"], max_steps=steps, per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=1, learning_rate=t.lr, lr_scheduler_type="cosine",
        warmup_steps=int(t.warmup_ratio * steps), weight_decay=t.weight_decay,
        adam_beta1=t.adam_betas[0], adam_beta2=t.adam_betas[1], optim="adamw_torch",
        max_grad_norm=t.max_grad_norm, seed=t.seed, data_seed=t.seed, use_cpu=True,
        eval_strategy="no", save_strategy="no", logging_strategy="steps", logging_steps=steps,
        report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        dataloader_pin_memory=False, skip_memory_metrics=True,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)
    trainer = CountingTrainer(model=model, args=args, train_dataset=dataset,
                              data_collator=collator, callbacks=[Clock()])
    start = time.perf_counter()
    marks[0] = (start, 0)
    output = trainer.train()
    seconds = time.perf_counter() - start
    return {
        "steps": trainer.state.global_step, "tokens": counts["tokens"],
        "train_seconds": seconds, "tokens_per_s": counts["tokens"] / seconds,
        **_steady(marks, warmup, steps), "padded_tokens": counts["padded"],
        "examples": counts["examples"], "final_loss": output.training_loss,
        "peak_rss_bytes": _peak_rss_bytes(),
    }


def run_worker(kind: str, config_path: Path, result_path: Path) -> int:
    import torch

    from peftune.recipe import load_recipe

    cfg = json.loads(config_path.read_text())
    torch.set_num_threads(cfg["threads"])
    recipe = load_recipe(cfg["recipe"])
    result = (worker_bare if kind == "bare" else worker_trainer)(recipe, cfg)
    result["torch_threads"] = torch.get_num_threads()
    result_path.write_text(json.dumps(result))
    return 0


# --------------------------------------------------------------------------- the three runs


def run_child(name: str, command: list[str], *, env: dict, log: Path) -> float:
    print(f"  {name:<12} running ...", end="", flush=True)
    began = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - began
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f" {wall:.1f}s wall (1-min load average after: {load:.2f})", flush=True)
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{name} failed with exit code {code}; last lines of {log}:\n{tail}")
    return wall


def peftune_result(run_dir: Path, warmup: int, steps: int) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    train = {r["step"]: r for r in records if "loss" in r}
    marks = {s: (r["elapsed_s"], r["tokens"]) for s, r in train.items()}
    marks[0] = (0.0, 0)
    return {
        "steps": summary["steps"], "tokens": summary["tokens"],
        "train_seconds": summary["train_seconds"], "tokens_per_s": summary["tokens_per_s"],
        **_steady(marks, warmup, steps), "setup_seconds": summary["setup_seconds"],
        "peak_rss_bytes": summary["peak_rss_bytes"], "final_loss": summary["final_loss"],
        "logged": {s: r["loss"] for s, r in sorted(train.items())},
    }


def ratios(results: dict) -> dict:
    p, tr, b = results["peftune"], results["trainer"], results["bare"]
    values = {
        "peftune_vs_trainer_tokens_per_s": p["steady_tokens_per_s"] / tr["steady_tokens_per_s"],
        "peftune_vs_trainer_peak_rss": p["peak_rss_bytes"] / tr["peak_rss_bytes"],
        "loop_overhead_vs_bare": 1 - p["steady_tokens_per_s"] / b["steady_tokens_per_s"],
    }
    whole = {
        "peftune_vs_trainer_tokens_per_s": p["tokens_per_s"] / tr["tokens_per_s"],
        "peftune_vs_trainer_peak_rss": values["peftune_vs_trainer_peak_rss"],
        "loop_overhead_vs_bare": 1 - p["tokens_per_s"] / b["tokens_per_s"],
    }
    out = {}
    for name, (what, op, target) in TARGETS.items():
        value = values[name]
        passed = value >= target if op == ">=" else value <= target
        shown = f"{target:.0%}" if "overhead" in name else f"{target:g}x"
        out[name] = {"what": what, "value": value, "whole_run_value": whole[name],
                     "target": target, "comparison": op, "target_shown": f"{op} {shown}",
                     "pass": passed}
    return out


def loss_check(peftune: dict, bare: dict) -> dict:
    """peftune and the bare loop train on the same batches from the same start: their logged
    window losses should agree to float precision (a check that the comparison is like for
    like)."""
    diffs, previous = [], 0
    for step, loss in peftune["logged"].items():
        window = bare["losses"][previous:step]
        diffs.append(abs(loss - sum(window) / len(window)))
        previous = step
    return {"same_real_tokens": peftune["tokens"] == bare["tokens"],
            "max_abs_loss_diff": max(diffs) if diffs else None}


def print_report(report: dict) -> None:
    r, cfg = report["systems"], report["config"]
    w = cfg["warmup_steps_discarded"]
    print()
    print(f"model: tiny llama, hidden {cfg['hidden_size']}, {cfg['layers']} layers, "
          f"{cfg['heads']} heads; LoRA r {LORA['r']} alpha {LORA['alpha']} all-linear; fp32; "
          f"torch threads: {cfg['threads']}")
    d = report["data"]
    print(f"data: {d['examples']:,} examples, {d['tokens']:,} tokens, lengths "
          f"{d['length_min']}..{d['length_max']} (median {d['length_median']:g}, mean "
          f"{d['length_mean']:g}); max_length {cfg['max_length']}")
    print(f"each system: {cfg['steps']} optimizer steps of micro-batch {cfg['batch_size']}; "
          f"warm-up: the first {w} steps are discarded from 'steady tok/s' (the figure the "
          f"targets use); 'train s' and 'tok/s' cover all steps")
    if cfg["repeats"] > 1:
        spread = "; ".join(f"{name} " + ", ".join(f"{v:,.0f}" for v in
                                                 r[name]["repeats_steady_tokens_per_s"])
                           for name in SYSTEMS)
        print(f"runs: {cfg['repeats']} of each system, interleaved; each row is that system's "
              f"fastest run (steady tok/s of every run: {spread})")
    print()
    header = (f"{'system':<21}{'steps':>6}{'real tokens':>13}{'ex/step':>9}{'fill':>7}"
              f"{'train s':>9}{'tok/s':>9}{'steady tok/s':>14}{'peak RSS MiB':>14}")
    print(header)
    print("-" * len(header))
    for name in SYSTEMS:
        s = r[name]
        fill = f"{s['fill']:.0%}" if s.get("fill") is not None else "-"
        per_step = f"{s['examples_per_step']:.1f}" if s.get("examples_per_step") else "-"
        print(f"{LABELS[name]:<21}{s['steps']:>6}{s['tokens']:>13,}{per_step:>9}{fill:>7}"
              f"{s['train_seconds']:>9.1f}{s['tokens_per_s']:>9,.0f}"
              f"{s['steady_tokens_per_s']:>14,.0f}{s['peak_rss_bytes'] / MiB:>14,.0f}")
    print("(fill: real tokens / batch cells; peftune's batches are the bare loop's, "
          "see the check below)")
    print()
    for item in report["ratios"].values():
        value, whole = item["value"], item["whole_run_value"]
        shown = (f"{value:.1%}  (all steps {whole:.1%})" if "overhead" in item["what"]
                 else f"{value:.2f}x  (all steps {whole:.2f}x)")
        verdict = "PASS" if item["pass"] else "MISS"
        print(f"{item['what']:<40} {shown:<30} target {item['target_shown']:<7} {verdict}")
    check = report["check"]
    print(f"check: peftune and bare loop saw the same real tokens: {check['same_real_tokens']}; "
          f"max |loss difference| over logged windows: {check['max_abs_loss_diff']:.2e}")
    loads = report["environment"]["load_average_1min"]
    if loads and max(loads) > cfg["threads"] + 0.5:
        print(f"note: the machine was busy (1-min load average up to {max(loads):.1f} on "
              f"{report['environment']['cpu_count']} CPUs): figures are noisier than usual")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, help=f"optimizer steps (default {FULL['steps']})")
    parser.add_argument("--batch-size", type=int,
                        help=f"micro-batch size (default {FULL['batch_size']})")
    parser.add_argument("--warmup", type=int,
                        help="first steps discarded from steady-state figures (default steps/10)")
    parser.add_argument("--threads", type=int,
                        help="torch threads in every system (default: torch's default; 1 with --quick)")
    parser.add_argument("--repeats", type=int,
                        help="runs of each system, interleaved; the fastest counts (default 2, "
                             "1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/bench_train.json"))
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--worker", choices=("bare", "trainer"), help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(args.worker, args.config, args.result)

    began = time.perf_counter()
    sizes = dict(QUICK if args.quick else FULL)
    steps = args.steps or sizes["steps"]
    batch_size = args.batch_size or sizes["batch_size"]
    warmup = args.warmup if args.warmup is not None else max(1, steps // 10)
    repeats = args.repeats or (1 if args.quick else 2)
    if repeats < 1:
        parser.error("--repeats must be at least 1")
    if not 0 < warmup < steps:
        parser.error(f"--warmup must be in [1, steps); got {warmup} with --steps {steps}")

    import torch

    from peftune.models import build_tiny_model

    # --quick: one thread, as its ops are too small to gain from more, and a second OpenMP
    # thread makes each op wait for a free core whenever the machine is busy.
    threads = args.threads or (1 if args.quick else torch.get_num_threads())
    work = Path(tempfile.mkdtemp(prefix="peftune-bench-"))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PEFTUNE_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "TOKENIZERS_PARALLELISM": "false"}
    os.environ.update({k: env[k] for k in ("PEFTUNE_CACHE", "HF_HUB_OFFLINE")})
    try:
        print(f"peftune training benchmark in {work}", flush=True)
        model = build_tiny_model(work / "model", hidden_size=sizes["hidden_size"],
                                 layers=sizes["layers"], heads=sizes["heads"], seed=0)
        corpus = work / "corpus.jsonl"
        # Enough text that peftune's packed rows do not run out within `steps`.
        build_corpus(corpus, tokens=int(1.3 * steps * batch_size * sizes["max_length"]) + 4096,
                     max_length=sizes["max_length"], seed=0)
        recipe = work / "recipe.yaml"
        write_recipe(recipe, model=model, data=corpus, out=work / "peftune-run", steps=steps,
                     batch_size=batch_size, max_length=sizes["max_length"], log_every=warmup)
        data = data_summary(recipe)
        cfg = {"recipe": str(recipe), "threads": threads, "warmup": warmup,
               "trainer_dir": str(work / "trainer-run")}
        (work / "config.json").write_text(json.dumps(cfg))

        runs: dict[str, list[dict]] = {name: [] for name in SYSTEMS}
        loads = []
        for round_ in range(1, repeats + 1):
            for kind in SYSTEMS:
                tag = f"{kind} {round_}/{repeats}" if repeats > 1 else kind
                if kind == "peftune":
                    command = [sys.executable, "-m", "peftune.cli", "train", str(recipe),
                               "--overwrite"]
                else:
                    command = [sys.executable, str(HERE), "--worker", kind, "--config",
                               str(work / "config.json"), "--result", str(work / f"{kind}.json")]
                wall = run_child(tag, command, env=env, log=work / f"{kind}-{round_}.log")
                loads.append(os.getloadavg()[0])
                result = (peftune_result(work / "peftune-run", warmup, steps) if kind == "peftune"
                          else json.loads((work / f"{kind}.json").read_text()))
                runs[kind].append({**result, "wall_seconds": wall})
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    # Noise on a shared machine only ever slows a run down: keep each system's fastest run.
    results = {}
    for name, attempts in runs.items():
        best = max(attempts, key=lambda r: r["steady_tokens_per_s"])
        results[name] = {**best, "repeats_steady_tokens_per_s":
                         [r["steady_tokens_per_s"] for r in attempts]}
    for s in results.values():
        s["peak_rss_mib"] = s["peak_rss_bytes"] / MiB
        if "padded_tokens" in s:
            s["fill"] = s["tokens"] / s["padded_tokens"]
            s["examples_per_step"] = s["examples"] / s["steps"]
    bare = results["bare"]
    results["peftune"].update(fill=bare["fill"], examples_per_step=bare["examples_per_step"])
    report = {
        "config": {**sizes, "steps": steps, "batch_size": batch_size, "threads": threads,
                   "warmup_steps_discarded": warmup, "repeats": repeats, "quick": args.quick,
                   "lora": LORA, "train": TRAIN},
        "data": data,
        "systems": results,
        "ratios": ratios(results),
        "check": loss_check(results["peftune"], bare),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "transformers": _version("transformers"), "peft": _version("peft"),
                        "cpu_count": os.cpu_count(), "load_average_1min": loads},
        "elapsed_seconds": time.perf_counter() - began,
    }
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out} ({report['elapsed_seconds']:.0f}s in all)")
    return 0


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
