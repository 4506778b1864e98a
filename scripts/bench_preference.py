"""Preference-training benchmark (`make bench`): a DPO step over a LoRA adapter against an SFT
step over the same tokens, on the real model.

Targets (issue: "DPO step time over an adapter is at most 1.6x an SFT step over the same
tokens; peak RSS at most 1.3x"): DPO adds, per micro-batch, one forward without gradients
with the adapter switched off (the reference log-probs, `reference: adapter_off`) and a
block-causal mask over the pair that shares a row; nothing else should cost.

Same tokens: B preference pairs per optimizer step are 2B sequences (prompt + chosen, prompt
+ rejected); the SFT run trains on exactly those 2B sequences as `data.format: instruction`
rows (prompt masked, response and EOS the targets, as in the pair), 2B per optimizer step,
and its rows are ordered so that SFT step k holds the very sequences of DPO step k (checked
token for token before anything is timed). `data.max_length` is the same (per sequence),
`data.packing` is off in both: SFT pads 2B rows of one sequence each, DPO B rows of one pair
each (two sequences, block-causal). The text is real English prose from the Python
documentation that ships with the interpreter (`pydoc_data.topics`): a prompt, its true
continuation (chosen) and a span of another topic (rejected), lengths drawn between
max_length/2 and max_length.

Systems, each in its own process (LoRA r 16, alpha 32, all linear layers; fp32; AdamW with
the same lr, cosine schedule and clipping; the same torch thread count):

  sft   `peftune train` with the default objective over the instruction rows;
  dpo   `peftune train` with `train.objective: {name: dpo, reference: adapter_off}`;
  trl   TRL's DPOTrainer + peft over the same pairs (reference: its adapter switched off),
        fp32 and gradient checkpointing off like peftune, its own tokenization, padding
        (2B rows padded together) and order: compare its tokens/s, not its step contents.

Step time is the mean over the steps after the first `--warmup` (model loading, data
preparation and warm-up excluded); tokens/s counts real (non-padding) tokens of those steps;
peak RSS is each process's (ru_maxrss: loading included). The ratios dpo/sft are printed
against the targets, PASS or MISS.

    python scripts/bench_preference.py [--model smollm2-135m-instruct|PATH|tiny] [--steps N]
        [--warmup W] [--batch-size PAIRS] [--max-length TOKENS] [--threads T] [--no-trl]

`--model tiny` trains a tiny random model built here (the smoke test, not a figure to quote).
Exits 0 whenever the measurement completes, also when a target is missed; 1 on errors.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import benchlib
import yaml
from benchlib import MiB

HERE = Path(__file__).resolve()
REAL_MODEL = "smollm2-135m-instruct"
SIZES = {"real": dict(steps=5, warmup=2, batch_size=2, max_length=512),
         "tiny": dict(steps=3, warmup=1, batch_size=2, max_length=128)}
TINY_MODEL = dict(hidden_size=32, layers=2, heads=4)
LORA = dict(r=16, alpha=32, dropout=0.0, target_modules="all-linear")
TRAIN = dict(lr=1.0e-4, scheduler="cosine", warmup_ratio=0.2, weight_decay=0.0,
             max_grad_norm=1.0, adam_betas=[0.9, 0.999], seed=0)
DPO = {"name": "dpo", "beta": 0.1, "reference": "adapter_off"}
PROMPT_TEMPLATE = "{prompt}\n"  # peftune's default; TRL gets the prompt already templated
LABELS = {"sft": "peftune sft", "dpo": "peftune dpo (adapter-off ref)",
          "trl": "TRL DPOTrainer + peft"}
# name: (numerator, denominator, measure, comparison, target)
TARGETS = {"step_time": ("dpo", "sft", "seconds_per_step", "<=", 1.6),
           "peak_rss": ("dpo", "sft", "peak_rss_bytes", "<=", 1.3)}


# --------------------------------------------------------------------------- data


def english_streams(tokenizer, *, min_tokens: int) -> list[list[int]]:
    """The pydoc topics (the Python documentation's English prose) as token ids, each topic
    of at least `min_tokens` tokens, in a fixed order."""
    from pydoc_data.topics import topics

    streams = [tokenizer(topics[key], add_special_tokens=False)["input_ids"] for key in sorted(topics)]
    return [ids for ids in streams if len(ids) >= min_tokens]


def build_pairs(tokenizer, *, pairs: int, max_length: int, seed: int) -> list[dict]:
    """`pairs` rows {prompt, chosen, rejected}: a span of a topic cut into a prompt and its
    true continuation (chosen), and a span of another topic after the same prompt
    (rejected). Each side's length is drawn from [max_length/2, max_length - slack], the
    slack leaving room for the template's newline, EOS and re-tokenization at the cuts."""
    rng = random.Random(seed)
    slack = max(8, max_length // 16)
    streams = english_streams(tokenizer, min_tokens=max_length)
    if len(streams) < 2:
        raise RuntimeError(f"the pydoc topics hold fewer than two texts of {max_length} tokens; "
                           "lower --max-length")
    cursors = [0] * len(streams)

    def take(source: int, size: int) -> list[int]:
        ids, start = streams[source], cursors[source]
        if start + size > len(ids):
            start = 0
        cursors[source] = start + size
        return ids[start:start + size]

    rows = []
    for i in range(pairs):
        chosen_total = rng.randint(max_length // 2, max_length - slack)
        rejected_total = rng.randint(max_length // 2, max_length - slack)
        prompt_size = rng.randint(max(4, chosen_total // 8), max(5, chosen_total // 3))
        span = take(i % len(streams), chosen_total)
        other = take((i + len(streams) // 2) % len(streams), rejected_total - prompt_size)
        rows.append({"prompt": tokenizer.decode(span[:prompt_size]).strip(),
                     "chosen": tokenizer.decode(span[prompt_size:]),
                     "rejected": tokenizer.decode(other)})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def write_recipe(path: Path, *, system: str, model: str, data: Path, out: Path, steps: int,
                 pairs_per_step: int, max_length: int) -> None:
    """The peftune recipe of `sft` (2 x pairs_per_step instruction rows a step) or `dpo`."""
    fields = ({"format": "instruction", "prompt_field": "prompt", "response_field": "response"}
              if system == "sft" else {"format": "preference"})
    train = {"max_steps": steps, "batch_size": pairs_per_step * (2 if system == "sft" else 1),
             "grad_accum": 1, "optimizer": "adamw", "precision": "fp32", "log_every": 1,
             "eval_every": None, "save_every": None, **TRAIN}
    if system == "dpo":
        train["objective"] = DPO
    recipe = {
        "model": {"path": model, "dtype": "float32"},
        "quant": {"method": "none"},
        "adapter": {"method": "lora", **LORA},
        "data": {"train": str(data), **fields, "prompt_template": PROMPT_TEMPLATE,
                 "max_length": max_length, "packing": False},
        "train": train,
        "output": {"dir": str(out)},
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))


def batch_sequences(batch: dict) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Each example of a micro-batch as (its tokens, its labels), sorted: by `segment_ids`
    where rows hold pairs, else one per row (its attention mask's ones)."""
    ids, labels = batch["input_ids"].tolist(), batch["labels"].tolist()
    found = []
    for j in range(len(ids)):
        if "segment_ids" in batch:
            owners = batch["segment_ids"][j].tolist()
            for owner in sorted(set(owners) - {-1}):
                at = [t for t, o in enumerate(owners) if o == owner]
                found.append((tuple(ids[j][t] for t in at), tuple(labels[j][t] for t in at)))
        else:
            n = int(batch["attention_mask"][j].sum())
            found.append((tuple(ids[j][:n]), tuple(labels[j][:n])))
    return sorted(found)


def worker_prepare(cfg: dict) -> dict:
    """Write the pairs and the SFT rows, ordered so that SFT step k holds DPO step k's
    sequences; check it through peftune's own data path and describe the data."""
    import numpy as np

    from peftune.data import build_datasets, micro_batches, pack_rows
    from peftune.models import load_tokenizer
    from peftune.recipe import load_recipe
    from peftune.train.setup import run_batches

    steps, pairs_per_step, max_length = cfg["total_steps"], cfg["batch_size"], cfg["max_length"]
    n_pairs = steps * pairs_per_step  # one epoch is the run: every pair once
    tokenizer = load_tokenizer(cfg["model_dir"])
    pairs = build_pairs(tokenizer, pairs=n_pairs, max_length=max_length, seed=TRAIN["seed"])
    write_jsonl(Path(cfg["files"]["pairs"]), pairs)

    def tokenized(system: str):
        recipe = load_recipe(cfg["recipes"][system])
        splits = build_datasets(recipe.data, tokenizer, seed=recipe.train.seed)
        if len(splits.train) != 2 * n_pairs:
            raise RuntimeError(f"{system}: {len(splits.train)} examples from {2 * n_pairs} "
                               "sequences: some were dropped")
        rows = pack_rows(splits.train, max_length=max_length, packing=False,
                         seed=recipe.train.seed)
        return splits, run_batches(recipe, rows, tokenizer, epoch=0), rows

    dpo_splits, dpo_batches, dpo_rows = tokenized("dpo")
    # The sequences in the order DPO's steps take them: example 2p is pair p's chosen side.
    in_step_order = [e for k in range(steps) for e in dpo_batches[k]["example_ids"].tolist()]
    # SFT's epoch order over 2N rows depends on the row count and the seed alone: put the
    # m-th sequence DPO trains on at the row SFT's order takes m-th.
    sft_order = micro_batches([*dpo_rows, *dpo_rows], batch_size=2 * pairs_per_step,
                              pad_id=tokenizer.pad_token_id, seed=TRAIN["seed"], epoch=0,
                              packing=True).order
    sft_rows: list[dict] = [{}] * (2 * n_pairs)
    for m, example in enumerate(in_step_order):
        pair = pairs[example // 2]
        sft_rows[int(sft_order[m])] = {"prompt": pair["prompt"],
                                       "response": pair["rejected" if example % 2 else "chosen"]}
    write_jsonl(Path(cfg["files"]["sft"]), sft_rows)
    sft_splits, sft_batches, _ = tokenized("sft")

    per_step = []
    for k in range(steps):
        dpo, sft = dpo_batches[k], sft_batches[k]
        if batch_sequences(dpo) != batch_sequences(sft):
            raise RuntimeError(f"step {k + 1}: the sft and dpo micro-batches hold different "
                               "sequences; the alignment of the sft rows failed")
        per_step.append({"tokens": int(dpo["num_tokens"]),
                         "targets": int((dpo["labels"][:, 1:] != -100).sum()),
                         "sft_padded": int(sft["input_ids"].numel()),
                         "dpo_padded": int(dpo["input_ids"].numel())})
    lengths = dpo_splits.train.lengths
    labels = dpo_splits.train.labels
    timed = per_step[cfg["warmup"]:]
    return {"pairs": n_pairs, "sequences": 2 * n_pairs, "same_sequences_every_step": True,
            "tokens": int(lengths.sum()), "target_tokens": int((labels != -100).sum()),
            "length_min": int(lengths.min()), "length_median": float(np.median(lengths)),
            "length_max": int(lengths.max()),
            "truncated": dpo_splits.stats["truncated"] + sft_splits.stats["truncated"],
            "per_step": per_step,
            "timed_tokens_per_step": statistics.mean(s["tokens"] for s in timed),
            "timed_targets_per_step": statistics.mean(s["targets"] for s in timed),
            "timed_sft_padded_per_step": statistics.mean(s["sft_padded"] for s in timed),
            "timed_dpo_padded_per_step": statistics.mean(s["dpo_padded"] for s in timed)}


# --------------------------------------------------------------------------- TRL


def worker_trl(cfg: dict) -> dict:
    """TRL's DPOTrainer + peft over the same pairs: fp32, no gradient checkpointing, the
    reference from the adapter switched off (TRL's default with a peft model)."""
    import datasets
    import torch
    from accelerate.utils import set_seed
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from peftune.models import load_tokenizer

    steps = cfg["total_steps"]
    pairs = [json.loads(line) for line in Path(cfg["files"]["pairs"]).read_text().splitlines()]
    dataset = datasets.Dataset.from_list([{**p, "prompt": PROMPT_TEMPLATE.format(prompt=p["prompt"])}
                                          for p in pairs])
    tokenizer = load_tokenizer(cfg["model_dir"])
    set_seed(TRAIN["seed"])
    model = AutoModelForCausalLM.from_pretrained(cfg["model_dir"], dtype=torch.float32,
                                                 attn_implementation="sdpa", use_safetensors=True)
    model.config.use_cache = False
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    counts, marks = {"tokens": 0, "padded": 0}, {}

    class Counting(DPOTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            counts["tokens"] += int(inputs["attention_mask"].sum())
            counts["padded"] += inputs["input_ids"].numel()
            return super().training_step(model, inputs, num_items_in_batch)

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            marks[0] = (time.perf_counter(), 0, 0)

        def on_step_end(self, args, state, control, **kwargs):
            marks[state.global_step] = (time.perf_counter(), counts["tokens"], counts["padded"])

    config = DPOConfig(
        output_dir=cfg["trl_dir"], max_steps=steps, per_device_train_batch_size=cfg["batch_size"],
        gradient_accumulation_steps=1, learning_rate=TRAIN["lr"], lr_scheduler_type="cosine",
        warmup_steps=int(TRAIN["warmup_ratio"] * steps), weight_decay=TRAIN["weight_decay"],
        adam_beta1=TRAIN["adam_betas"][0], adam_beta2=TRAIN["adam_betas"][1],
        optim="adamw_torch", max_grad_norm=TRAIN["max_grad_norm"], seed=TRAIN["seed"],
        data_seed=TRAIN["seed"], use_cpu=True, eval_strategy="no", save_strategy="no",
        logging_steps=steps, report_to="none", disable_tqdm=True, dataloader_num_workers=0,
        dataloader_pin_memory=False, bf16=False, gradient_checkpointing=False,
        max_length=cfg["max_length"], beta=DPO["beta"], precompute_ref_log_probs=False)
    trainer = Counting(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                       peft_config=lora, callbacks=[Clock()])
    trainer.train()
    return {"steps": trainer.state.global_step, "marks": {str(k): v for k, v in marks.items()},
            "peak_rss_bytes": benchlib.peak_rss_bytes(),
            "trl_gradient_checkpointing": bool(config.gradient_checkpointing),
            "trl_bf16": bool(config.bf16)}


WORKERS = {"prepare": worker_prepare, "trl": worker_trl}


def run_worker(kind: str, config_path: Path, result_path: Path) -> int:
    import torch

    cfg = json.loads(config_path.read_text())
    torch.set_num_threads(cfg["threads"])
    result_path.write_text(json.dumps(WORKERS[kind](cfg)))
    return 0


# --------------------------------------------------------------------------- figures


def timed(marks: dict[int, tuple], warmup: int, steps: int) -> dict:
    """Step time and tokens/s between the end of step `warmup` and the end of step `steps`
    (marks: step -> (seconds, cumulative real tokens[, cumulative padded tokens]))."""
    seconds = [marks[s][0] - marks[s - 1][0] for s in range(warmup + 1, steps + 1)]
    tokens = marks[steps][1] - marks[warmup][1]
    out = {"timed_steps": steps - warmup, "step_seconds": seconds,
           "seconds_per_step": sum(seconds) / len(seconds),
           "tokens_per_step": tokens / (steps - warmup), "tokens_per_s": tokens / sum(seconds)}
    if len(marks[steps]) > 2:
        out["padded_per_step"] = (marks[steps][2] - marks[warmup][2]) / (steps - warmup)
    return out


def peftune_result(run_dir: Path, warmup: int, steps: int) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    marks = {r["step"]: (r["elapsed_s"], r["tokens"]) for r in records if "loss" in r}
    if sorted(marks) != list(range(1, steps + 1)):
        raise RuntimeError(f"{run_dir}: metrics.jsonl logs steps {sorted(marks)}, expected 1..{steps}")
    marks[0] = (0.0, 0)  # only differences from step `warmup` on are used
    return {"steps": summary["steps"], **timed(marks, warmup, steps),
            "peak_rss_bytes": summary["peak_rss_bytes"], "setup_seconds": summary["setup_seconds"],
            "reference": summary["objective"].get("reference"), "final_loss": summary["final_loss"]}


def trl_result(raw: dict, warmup: int, steps: int) -> dict:
    marks = {int(k): tuple(v) for k, v in raw["marks"].items()}
    return {"steps": raw["steps"], **timed(marks, warmup, steps),
            "peak_rss_bytes": raw["peak_rss_bytes"], "reference": "adapter_off",
            "gradient_checkpointing": raw["trl_gradient_checkpointing"], "bf16": raw["trl_bf16"]}


def ratios(systems: dict) -> dict:
    out = {}
    for name, (num, den, measure, comparison, target) in TARGETS.items():
        what = (f"{num} / {den} step time (same tokens)" if measure == "seconds_per_step"
                else f"{num} / {den} peak RSS")
        value = (systems[num][measure] / systems[den][measure]
                 if num in systems and den in systems else None)
        out[name] = {**benchlib.verdict(what, value, comparison, target),
                     "target_shown": f"{comparison} {target:g}x"}
    return out


def print_report(report: dict) -> None:
    cfg, data, systems = report["config"], report["data"], report["systems"]
    print()
    print(f"model: {cfg['model']}; LoRA r {LORA['r']} alpha {LORA['alpha']} all-linear; fp32; "
          f"torch threads {cfg['threads']}")
    print(f"data: {data['pairs']} pairs of the pydoc topics (English prose) = {data['sequences']} "
          f"sequences of {data['length_min']}..{data['length_max']} tokens (median "
          f"{data['length_median']:g}), {data['truncated']} truncated at max_length "
          f"{cfg['max_length']}")
    print(f"same tokens: every optimizer step of sft and dpo holds the same "
          f"{2 * cfg['batch_size']} sequences ({cfg['batch_size']} pairs: prompt + chosen, prompt "
          f"+ rejected), token for token (checked: {data['same_sequences_every_step']}); packing "
          "off in both")
    print(f"  a timed step holds {data['timed_tokens_per_step']:,.0f} real tokens "
          f"({data['timed_targets_per_step']:,.0f} targets); padded: sft "
          f"{data['timed_sft_padded_per_step']:,.0f} ({2 * cfg['batch_size']} rows of one "
          f"sequence), dpo {data['timed_dpo_padded_per_step']:,.0f} ({cfg['batch_size']} rows of "
          "one pair, block-causal)")
    print(f"each system: {cfg['total_steps']} optimizer steps, the first {cfg['warmup']} not "
          f"timed; figures over the {cfg['steps']} after them")
    header = (f"{'system':<31}{'tokens/step':>12}{'s/step':>9}{'tokens/s':>10}"
              f"{'peak RSS MiB':>14}  reference")
    print()
    print(header)
    print("-" * len(header))
    for name, s in systems.items():
        print(f"{LABELS[name]:<31}{s['tokens_per_step']:>12,.0f}{s['seconds_per_step']:>9.2f}"
              f"{s['tokens_per_s']:>10,.1f}{s['peak_rss_bytes'] / MiB:>14,.0f}  "
              f"{s.get('reference') or '-'}")
    if report.get("trl_skipped"):
        print(f"{LABELS['trl']:<31}not run: {report['trl_skipped']}")
    elif "trl" in systems:
        print("  (TRL: the same pairs in its own order and tokenization, 2B rows padded together; "
              "compare tokens/s)")
    print()
    for item in report["ratios"].values():
        shown = "-" if item["value"] is None else f"{item['value']:.2f}x"
        print(benchlib.verdict_line(item, width=40, value=f"{shown:>7}",
                                    target=item["target_shown"], missed="MISS"))
    if "trl" in systems and "dpo" in systems:
        ratio = systems["dpo"]["tokens_per_s"] / systems["trl"]["tokens_per_s"]
        rss = systems["dpo"]["peak_rss_bytes"] / systems["trl"]["peak_rss_bytes"]
        print(f"{'peftune dpo / TRL DPO tokens/s':<40} {ratio:>6.2f}x   (no target)")
        print(f"{'peftune dpo / TRL DPO peak RSS':<40} {rss:>6.2f}x   (no target)")
    note = benchlib.busy_note(report["environment"]["load_average_1min"],
                              limit=cfg["threads"] + 0.5)
    if note:
        print(f"note: {note}")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=REAL_MODEL,
                        help=f"model path or catalogue name, or 'tiny' for a tiny random model "
                             f"built here (default {REAL_MODEL})")
    parser.add_argument("--steps", type=int, help="timed optimizer steps (default 5; 3 tiny)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default 2; 1 tiny)")
    parser.add_argument("--batch-size", type=int,
                        help="preference pairs per step; sft gets twice as many sequences "
                             "(default 2)")
    parser.add_argument("--max-length", type=int, help="tokens per sequence (default 512; 128 tiny)")
    parser.add_argument("--threads", type=int,
                        help="torch threads in every system (default: torch's; 1 tiny)")
    parser.add_argument("--no-trl", action="store_true", help="leave TRL's DPOTrainer out")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/bench_preference.json"))
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--worker", choices=tuple(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return run_worker(args.worker, args.config, args.result)

    tiny = args.model == "tiny"
    sizes = SIZES["tiny" if tiny else "real"]
    steps = args.steps or sizes["steps"]
    warmup = args.warmup if args.warmup is not None else sizes["warmup"]
    batch_size = args.batch_size or sizes["batch_size"]
    max_length = args.max_length or sizes["max_length"]
    threads = args.threads or (1 if tiny else (os.cpu_count() or 1))
    if steps < 1 or warmup < 0 or batch_size < 1 or max_length < 32:
        parser.error("--steps and --batch-size must be >= 1, --warmup >= 0, --max-length >= 32")

    began = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="peftune-bench-pref-"))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if tiny:  # the tiny model's data cache is thrown away; the real model's is the user's
        env["PEFTUNE_CACHE"] = str(work / "cache")
    cfg = {"steps": steps, "warmup": warmup, "total_steps": warmup + steps,
           "batch_size": batch_size, "max_length": max_length, "threads": threads,
           "files": {"pairs": str(work / "pairs.jsonl"), "sft": str(work / "sft.jsonl")},
           "recipes": {}, "trl_dir": str(work / "trl-run")}
    systems, loads, report = {}, [], {}
    try:
        print(f"peftune preference benchmark in {work}", flush=True)
        cfg["model"] = model = "tiny" if tiny else args.model
        if tiny:
            model = str(work / "tiny-model")
            _child(work, env, "build tiny model", [sys.executable, "-c",
                   "import sys; from peftune.models import build_tiny_model; "
                   f"build_tiny_model(sys.argv[1], seed=0, **{TINY_MODEL!r})", model])
        _child(work, env, "resolve model", [sys.executable, "-c",
               "import sys; from peftune.models import resolve_model_path; "
               "open(sys.argv[2], 'w').write(str(resolve_model_path(sys.argv[1])))",
               model, str(work / "model_dir.txt")])  # a catalogue model is pulled here, once
        cfg["model_dir"] = (work / "model_dir.txt").read_text()
        for system, data in (("sft", cfg["files"]["sft"]), ("dpo", cfg["files"]["pairs"])):
            recipe = work / f"{system}.yaml"
            write_recipe(recipe, system=system, model=model, data=Path(data), out=work / system,
                         steps=warmup + steps, pairs_per_step=batch_size, max_length=max_length)
            cfg["recipes"][system] = str(recipe)
        (work / "config.json").write_text(json.dumps(cfg))
        report["data"] = _worker(work, env, "prepare", "prepare data (tokenize, align steps)")

        for system in ("sft", "dpo"):
            _child(work, env, system, [sys.executable, "-m", "peftune.cli", "train",
                                       cfg["recipes"][system], "--overwrite"])
            systems[system] = peftune_result(work / system, warmup, warmup + steps)
            loads.append(benchlib.load_average())
        missing = benchlib.missing_modules(["trl"])
        if args.no_trl:
            report["trl_skipped"] = "--no-trl"
        elif missing:
            report["trl_skipped"] = "trl is not installed (pip install -e '.[bench]')"
        else:
            try:
                raw = _worker(work, env, "trl", "trl")
                systems["trl"] = trl_result(raw, warmup, warmup + steps)
                loads.append(benchlib.load_average())
            except RuntimeError as err:  # said in the table, not dropped
                report["trl_skipped"] = f"failed on this machine: {str(err).splitlines()[0]}"
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    report["config"] = {**{k: v for k, v in cfg.items() if k not in ("files", "recipes", "trl_dir")},
                        "lora": LORA, "train": TRAIN, "objective": DPO}
    report["systems"] = systems
    report["ratios"] = ratios(systems)
    report["environment"] = {
        "python": platform.python_version(),
        **{name: benchlib.package_version(name) for name in ("torch", "transformers", "peft", "trl")},
        "cpu_count": os.cpu_count(), "load_average_1min": loads}
    report["elapsed_seconds"] = time.perf_counter() - began
    print_report(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out} ({report['elapsed_seconds']:.0f}s in all)")
    return 0


def _child(work: Path, env: dict, name: str, command: list[str], *,
           log: str | None = None) -> benchlib.ChildRun:
    log_path = work / f"{log or name.replace(' ', '-')}.log"
    return benchlib.run_child(name, command, log=log_path, env=env, width=36)


def _worker(work: Path, env: dict, kind: str, name: str) -> dict:
    result = work / f"{kind}-result.json"
    _child(work, env, name, [sys.executable, str(HERE), "--worker", kind,
                             "--config", str(work / "config.json"), "--result", str(result)],
           log=kind)
    return json.loads(result.read_text())


if __name__ == "__main__":
    benchlib.run_main(main)
