"""Benchmark: `peftune eval`'s perplexity task against a bare batched forward loop over the
same texts (same model, same tokens, same batch size, batches of similar length).

The bare loop tokenizes the texts itself (BOS + text + EOS), sorts them by length, pads
each batch on the right and sums the cross-entropy of every token after the first: what
anyone would write by hand. peftune's number is the task's evaluation time (batches run,
gathered and summarised; the model is loaded once before either is timed); its whole
`run_eval` wall time, with reading and tokenizing the data and writing the report, is
printed too. Target: peftune's overhead over the bare loop <= 10%. The two run in
alternation (peftune, bare, bare, peftune, ...) `--repeats` times each, on `--threads`
threads (1 by default: a shared machine's other load then slows both alike), and the
fastest run of each counts. The two losses must agree to 1e-5.

    python scripts/bench_eval.py            # ~2 min on one CPU core
    python scripts/bench_eval.py --quick    # smoke-test size
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import benchlib

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
         "every jovial boxer and sphinx of black quartz judges my vow").split()


def corpus(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 90)))}
            for _ in range(n)]


def bare_loop(model, tokenizer, texts: list[str], batch_size: int) -> tuple[float, float, int]:
    """(seconds, mean loss, target tokens) of a plain batched forward pass."""
    import torch
    import torch.nn.functional as F

    started = time.perf_counter()
    rows = [[tokenizer.bos_token_id, *tokenizer(t, add_special_tokens=False)["input_ids"],
             tokenizer.eos_token_id] for t in texts]
    rows.sort(key=len, reverse=True)
    total, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            width = max(map(len, chunk))
            ids = torch.full((len(chunk), width), tokenizer.pad_token_id)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for j, row in enumerate(chunk):
                ids[j, :len(row)] = torch.tensor(row)
                mask[j, :len(row)] = 1
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            labels = ids.masked_fill(mask == 0, -100)
            total += float(F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels[:, 1:],
                                           ignore_index=-100, reduction="sum"))
            count += int((labels[:, 1:] != -100).sum())
    return time.perf_counter() - started, total / count, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke-test size")
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/bench_eval.json"))
    args = parser.parse_args()
    if args.quick:
        args.examples, args.repeats = 48, 1
    import torch

    torch.set_num_threads(args.threads)

    from peftune.evaluate.runner import run_eval
    from peftune.evaluate.targets import Target, load_target
    from peftune.models import build_tiny_model
    from peftune.recipe.schema import EvalSection, EvalTask, ModelSection

    work = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    hidden, layers = (64, 2) if args.quick else (256, 4)
    model_dir = build_tiny_model(work / "model", hidden_size=hidden, layers=layers, heads=4)
    rows = corpus(args.examples)
    data = work / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    target = Target(label="bench", model=ModelSection(path=str(model_dir)))
    loaded = load_target(target, device=torch.device("cpu"))
    config = EvalSection(batch_size=args.batch_size,
                         tasks=[EvalTask(task="perplexity", data=str(data))])
    bare_loop(loaded.model, loaded.tokenizer, [r["text"] for r in rows[:args.batch_size]],
              args.batch_size)  # warm-up

    peftune_task, peftune_wall, bare = [], [], []
    for repeat in range(args.repeats):
        for side in (("peftune", "bare") if repeat % 2 == 0 else ("bare", "peftune")):
            if side == "peftune":
                tick = time.perf_counter()
                report = run_eval(targets=[target], config=config, out=None, quiet=True,
                                  loaded=loaded)
                peftune_wall.append(time.perf_counter() - tick)
                result = report["models"][0]["tasks"]["perplexity"]
                peftune_task.append(result["seconds"])
            else:
                seconds, bare_loss, bare_tokens = bare_loop(
                    loaded.model, loaded.tokenizer, [r["text"] for r in rows], args.batch_size)
                bare.append(seconds)
        print(f"repeat {repeat + 1}: peftune task {peftune_task[-1]:.3f}s (run_eval wall "
              f"{peftune_wall[-1]:.3f}s), bare loop {bare[-1]:.3f}s")
    metrics = result["metrics"]
    tokens = metrics["tokens"]["value"]
    ratio = min(peftune_task) / min(bare)
    summary = {
        "config": {"examples": args.examples, "batch_size": args.batch_size, "hidden": hidden,
                   "threads": args.threads,
                   "layers": layers, "repeats": args.repeats, "tokens": tokens},
        "peftune": {"task_seconds": min(peftune_task), "run_eval_seconds": min(peftune_wall),
                    "tokens_per_s": tokens / min(peftune_task), "loss": metrics["loss"]["value"]},
        "bare": {"seconds": min(bare), "tokens_per_s": bare_tokens / min(bare), "loss": bare_loss},
        "check": {"same_tokens": tokens == bare_tokens,
                  "loss_diff": abs(metrics["loss"]["value"] - bare_loss)},
        "overhead": {"value": ratio - 1, "target": 0.10,
                     "pass": benchlib.meets(ratio - 1, "<=", 0.10)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"model: {layers} layers, hidden {hidden}; {args.examples} texts, {tokens:,} target "
          f"tokens, batch {args.batch_size}, {args.threads} thread(s); fastest of {args.repeats}")
    print(f"peftune perplexity task   {summary['peftune']['tokens_per_s']:>10,.0f} tokens/s  "
          f"({min(peftune_task):.3f}s; whole run_eval {min(peftune_wall):.3f}s)")
    print(f"bare batched forward loop {summary['bare']['tokens_per_s']:>10,.0f} tokens/s  "
          f"({min(bare):.3f}s)")
    print(f"same tokens: {summary['check']['same_tokens']}; loss difference "
          f"{summary['check']['loss_diff']:.2e}")
    verdict = benchlib.verdict_word(summary["overhead"]["pass"])
    print(f"peftune eval overhead vs bare loop: {100 * (ratio - 1):+.1f}% "
          f"(ratio {ratio:.3f}; target <= +10%) {verdict}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
