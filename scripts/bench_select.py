"""Data-selection benchmark: peftune `select-data` vs the reference packages `data-selection`
(DSIR) and `zip-fit` (ZIP-FIT), run on the same inputs in one run.

Inputs (built once under --workdir, reused while the parameters are the same): a pool of
--pool-size JSONL documents {"text", "label"} cut from the Python standard library's own
sources (blank-line-separated blocks, cut into windows of 1-6 lines) and from the prose of
`pydoc_data.topics`, labelled by source: "docs" for the pydoc prose, "test" for every test
file, "gui" for idlelib, tkinter, turtledemo and turtle, "modules" for top-level modules,
else the top-level package ("email", "asyncio", ...). The target is --target-size documents
of one label (--target-label, default "docs": English prose in a pool of mostly code) cut
from sources held out of the pool, so no target document is in the pool.

DSIR       peftune `select-data --method dsir` vs `data_selection.HashedNgramDSIR` (fit +
           importance weights + resample, its hashing included), both with the same number of
           processes, both keeping short documents (the reference's min_example_length=0; its
           default of 100 tokens would drop most of this pool: --ref-default-min-length adds
           that run). Time, docs/s, peak RSS, target-label precision (share of the selected
           documents with the target's label) and KL reduction, both selections scored with
           peftune's own `kl_reduction` over the same hashed n-grams.
ZIP-FIT    (a) gzip level 1: peftune's pair throughput (pool x target pairs per second of its
           scoring phase) vs a raw `zlib.compress(x + y, 1)` loop over the same pairs on all
           cores; (b) lz4: peftune on the full pool vs `zip_fit.zipfit.ZIPFIT`, which keeps all
           pairs in memory and is measured on a sub-sample of the pool and extrapolated
           linearly; (c) scale: peftune on the full pool x the full target with lz4, whose
           peak RSS must stay under 2 GB, beside the reference's projected memory. peftune's
           scores are checked against the formula with the compressor called directly
           (`gzip.compress`, `lz4.frame.compress`), and against the reference's scores.

Every run is a child process; peak RSS is the sum over its process tree (sampled every
100 ms by `benchlib.run_child`; pages shared between processes count once per process).

    python scripts/bench_select.py [--pool-size N] [--target-size N] [--k K] [--quick]
                                   [--workdir DIR] [--out FILE] [--no-scale-test]
                                   [--repeats R] [--ref-pool N] [--ref-default-min-length]

Each compared system runs --repeats times (2; 1 with --quick), interleaved in alternating
order (A B, then B A), and its fastest run counts. The full run takes ~4 minutes on 2 idle cores, ~100 s of it the scale test.

Exits 0 whenever the measurement completes, also when a target is missed (FAIL lines);
non-zero on errors. Installs nothing: a missing reference package skips its comparison.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import multiprocessing
import os
import platform
import random
import re
import shutil
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import benchlib
import numpy as np
import psutil
from benchlib import MiB

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
GB = 10**9
CORPUS_VERSION = 1  # bump when the way documents are cut changes
GUI = {"idlelib", "tkinter", "turtledemo", "turtle"}
FULL = dict(pool_size=200_000, target_size=1_000, k=10_000, gzip_pool=20_000,
            gzip_targets=100, lz4_targets=100, ref_pool=20_000, formula_rows=200)
QUICK = dict(pool_size=3_000, target_size=200, k=300, gzip_pool=1_000, gzip_targets=20,
             lz4_targets=20, ref_pool=500, formula_rows=50)
SCALE_RSS_LIMIT = 2 * GB
LOADS: list[float] = []  # 1-minute load average after each run
# (description, comparison, target); the tolerances allow for two different Gumbel draws
TARGETS = {
    "dsir_speedup": ("DSIR: reference / peftune, in-process times", ">=", 10.0),
    "dsir_speedup_long_documents": ("DSIR, long documents: reference / peftune", ">=", 10.0),
    "dsir_kl_reduction": ("DSIR: KL reduction, peftune - reference", ">=", None),
    "dsir_precision": ("DSIR: target-label precision, peftune - reference", ">=", -0.005),
    "zipfit_formula_gzip": ("ZIP-FIT gzip: max |score - formula|", "<=", 1e-12),
    "zipfit_formula_lz4": ("ZIP-FIT lz4: max |score - formula|", "<=", 1e-12),
    "zipfit_vs_reference_scores": ("ZIP-FIT lz4: max |score - reference's|", "<=", 1e-12),
    "zipfit_gzip_vs_zlib_loop": ("ZIP-FIT gzip: pairs/s / raw zlib loop", ">=", 0.9),
    "zipfit_lz4_vs_reference": ("ZIP-FIT lz4: pairs/s / reference", ">=", 5.0),
    "zipfit_scale_rss": ("ZIP-FIT lz4 scale: peak RSS (GB)", "<", SCALE_RSS_LIMIT / GB),
}
KL_RELATIVE_TOLERANCE = 0.01
# The modules each reference package imports (zip-fit imports zstandard, brotli and datasets
# without declaring them).
REFERENCE_MODULES = {"data-selection": ("data_selection", "nltk", "joblib", "tqdm"),
                     "zip-fit": ("zip_fit", "lz4", "zstandard", "brotli", "datasets")}


# --------------------------------------------------------------------------- inputs


def label_of(relative: Path) -> str | None:
    """The label of a stdlib file, None for files left out (third-party packages, the
    pydoc prose's own module, build configuration)."""
    top = relative.parts[0] if len(relative.parts) > 1 else relative.stem
    if top in ("site-packages", "pydoc_data") or top.startswith("config-"):
        return None
    if any(part in ("test", "tests", "idle_test") for part in relative.parts[:-1]):
        return "test"  # tests of every package: one label, so a package's label is its code
    if top in GUI:
        return "gui"
    return "modules" if len(relative.parts) == 1 else top


def cut_documents(text: str, rng: random.Random) -> list[str]:
    """Blank-line-separated blocks, each cut into windows of 1-6 lines; windows with fewer
    than 20 non-space characters are dropped."""
    docs = []
    for block in re.split(r"\n[ \t]*\n", text):
        lines = block.strip("\n").split("\n")
        start = 0
        while start < len(lines):
            width = rng.randint(1, 6)
            window = "\n".join(lines[start:start + width])
            start += width
            if len("".join(window.split())) >= 20:
                docs.append(window)
    return docs


def labelled_sources(seed: int) -> list[tuple[str, str, list[str]]]:
    """(label, source name, documents) for every stdlib .py file and every pydoc topic."""
    from pydoc_data import topics

    rng = random.Random(seed)
    root = Path(sysconfig.get_paths()["stdlib"])
    sources = []
    for path in sorted(root.rglob("*.py")):
        label = label_of(path.relative_to(root))
        if label is not None:
            text = path.read_text(encoding="utf-8", errors="replace")
            sources.append((label, str(path.relative_to(root)), cut_documents(text, rng)))
    for name, text in sorted(topics.topics.items()):
        sources.append(("docs", f"pydoc:{name}", cut_documents(text, rng)))
    return sources


def write_rows(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w") as handle:
        for label, text in rows:
            handle.write(json.dumps({"text": text, "label": label}) + "\n")


def read_rows(path: Path) -> list[dict]:
    with path.open() as handle:
        return [json.loads(line) for line in handle if line.strip()]


def build_inputs(workdir: Path, sizes: dict, *, target_label: str, seed: int) -> dict:
    """Write the pool, the held-out target and the sub-sample files; reuse them when the
    manifest says they were built with the same parameters."""
    params = {"version": CORPUS_VERSION, "python": platform.python_version(),
              "stdlib": sysconfig.get_paths()["stdlib"], "target_label": target_label,
              "seed": seed, **{key: sizes[key] for key in ("pool_size", "target_size",
                                                          "gzip_pool", "gzip_targets",
                                                          "lz4_targets", "ref_pool")}}
    manifest_path = workdir / "inputs.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest["params"] == params and all(Path(p).exists()
                                                for p in manifest["files"].values()):
            print(f"inputs: reusing {workdir}")
            return manifest
    began = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    sources = labelled_sources(seed)
    labels = sorted({label for label, _, _ in sources})
    if target_label not in labels:
        raise RuntimeError(f"--target-label {target_label!r} is not a label of this corpus; "
                           f"use one of: {', '.join(labels)}")
    # Hold out whole target-label files (in a seeded order) until they give enough documents.
    candidates = [s for s in sources if s[0] == target_label]
    rng.shuffle(candidates)
    held, held_docs = set(), []
    for _, name, docs in candidates:
        if len(held_docs) >= sizes["target_size"]:
            break
        held.add(name)
        held_docs += docs
    if len(held_docs) < sizes["target_size"]:
        raise RuntimeError(f"label {target_label!r} has only {len(held_docs)} documents; use "
                           f"--target-size <= {len(held_docs)} or another --target-label")
    target = [(target_label, text) for text in rng.sample(held_docs, sizes["target_size"])]
    available = [(label, text) for label, name, docs in sources if name not in held
                 for text in docs]
    if len(available) < sizes["pool_size"]:
        raise RuntimeError(f"the corpus has {len(available):,} documents outside the target; "
                           f"use --pool-size <= {len(available):,}")
    pool = rng.sample(available, sizes["pool_size"])  # a seeded shuffle: labels interleaved
    files = {name: str(workdir / f"{name}.jsonl") for name in
             ("pool", "target", "gzip_pool", "gzip_target", "lz4_target", "ref_pool")}
    write_rows(Path(files["pool"]), pool)
    write_rows(Path(files["target"]), target)
    write_rows(Path(files["gzip_pool"]), pool[:sizes["gzip_pool"]])
    write_rows(Path(files["gzip_target"]), target[:sizes["gzip_targets"]])
    write_rows(Path(files["lz4_target"]), target[:sizes["lz4_targets"]])
    write_rows(Path(files["ref_pool"]), pool[:sizes["ref_pool"]])
    counts: dict[str, int] = {}
    for label, _ in pool:
        counts[label] = counts.get(label, 0) + 1
    manifest = {
        "params": params, "files": files, "held_out_sources": len(held),
        "pool_labels": dict(sorted(counts.items(), key=lambda item: -item[1])),
        "pool_mean_chars": sum(len(text) for _, text in pool) / len(pool),
        "target_mean_chars": sum(len(text) for _, text in target) / len(target),
    }
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"inputs: built in {workdir} ({time.perf_counter() - began:.1f}s)")
    return manifest


# --------------------------------------------------------------------------- measuring


def run_measured(name: str, command: list[str], *, log: Path, env: dict) -> dict:
    """Run a child to completion; its wall time and the peak RSS summed over its tree."""
    run = benchlib.run_child(
        name, command, log=log, env=env, sample_rss=True, width=50, waiting="...",
        describe=lambda run: (f" {run.wall_seconds:7.1f}s  peak RSS "
                              f"{run.peak_rss_bytes / MiB:7,.0f} MiB"))
    LOADS.append(run.load_after)
    return {"wall_seconds": run.wall_seconds, "peak_rss_bytes": run.peak_rss_bytes}


def run_worker_child(name: str, kind: str, config: dict, *, work: Path, env: dict) -> dict:
    """This script in worker mode (a reference package or the zlib loop) as a child."""
    config_path, result_path = work / f"{kind}.config.json", work / f"{kind}.result.json"
    config_path.write_text(json.dumps(config))
    result_path.unlink(missing_ok=True)
    measured = run_measured(name, [sys.executable, str(HERE), "--worker", kind, "--config",
                                   str(config_path), "--result", str(result_path)],
                            log=work / f"{kind}.log", env=env)
    return {**json.loads(result_path.read_text()), **measured}


def run_peftune(name: str, *, method: str, pool: str, target: str, k: int, out: Path,
                procs: int, env: dict, extra: tuple[str, ...] = ()) -> dict:
    command = [sys.executable, "-m", "peftune.cli", "select-data", "--method", method,
               "--pool", pool, "--target", target, "--k", str(k), "--out", str(out),
               "--seed", "0", "--num-proc", str(procs), "--label-field", "label",
               "--overwrite", "--quiet", *extra]
    measured = run_measured(name, command, log=out.parent / f"{out.name}.log", env=env)
    report = json.loads((out / "report.json").read_text())
    return {"report": report, "out": str(out), **measured}


def precision(labels: list[str], target_label: str) -> float:
    return sum(label == target_label for label in labels) / max(len(labels), 1)


# --------------------------------------------------------------------------- workers


def worker_dsir_reference(cfg: dict) -> dict:
    """data-selection's HashedNgramDSIR: fit both bags of n-grams, weight the pool,
    resample k (its hashing and its process pool included in the time)."""
    from data_selection import HashedNgramDSIR

    for path in (cfg["cache_dir"], cfg["out_dir"]):
        shutil.rmtree(path, ignore_errors=True)
    began = time.perf_counter()
    dsir = HashedNgramDSIR([cfg["pool"]], [cfg["target"]], cache_dir=cfg["cache_dir"],
                           num_proc=cfg["num_proc"], min_example_length=cfg["min_length"])
    dsir.fit_importance_estimator(num_tokens_to_fit="auto")
    fitted = time.perf_counter()
    dsir.compute_importance_weights()
    weighted = time.perf_counter()
    np.random.seed(cfg["seed"])  # the reference draws its Gumbel noise from numpy's global RNG
    dsir.resample(out_dir=cfg["out_dir"], num_to_sample=cfg["k"])
    done = time.perf_counter()
    return {"timings": {"fit": fitted - began, "weights": weighted - fitted,
                        "resample": done - weighted, "total": done - began},
            "selected_files": sorted(str(p) for p in Path(cfg["out_dir"]).glob("*.jsonl"))}


def worker_zipfit_reference(cfg: dict) -> dict:
    """zip-fit's ZIPFIT on a sub-sample: load both files, rank every pool document (it
    builds the whole pool x target pair list, then scores it on all cores)."""
    from zip_fit.zipfit import ZIPFIT

    began = time.perf_counter()
    zipfit = ZIPFIT(cfg["pool"], cfg["target"], k=cfg["pool_size"],
                    output_file=cfg["out_file"], compression_algorithm=cfg["compressor"],
                    compress_level=cfg["level"])
    source = zipfit.load_and_process_datasets(cfg["pool"], None, None)
    target = zipfit.load_and_process_datasets(cfg["target"], None, None)
    loaded = time.perf_counter()
    rss_before = benchlib.current_rss_bytes()
    ranked = zipfit.rank_sequences_by_alignment(source, target)
    done = time.perf_counter()
    peak = benchlib.peak_rss_bytes()
    by_text = dict(ranked)  # a text's score does not depend on where it occurs
    np.save(cfg["scores"], np.array([by_text[text] for text in source], dtype=np.float64))
    pairs = len(source) * len(target)
    return {"timings": {"load": loaded - began, "rank": done - loaded, "total": done - began},
            "pairs": pairs, "main_rss_before_rank": rss_before, "main_peak_rss": peak,
            "bytes_per_pair": max(peak - rss_before, 0) / pairs}


_LOOP: dict = {}


def _zlib_chunk(bounds: tuple[int, int]) -> int:
    compress, level, targets = zlib.compress, _LOOP["level"], _LOOP["targets"]
    total = 0
    for x in _LOOP["pool"][bounds[0]:bounds[1]]:
        for y in targets:
            total += len(compress(x + y, level))
    return total


def worker_zlib_loop(cfg: dict) -> dict:
    """The floor for gzip scoring: `zlib.compress(x + y, level)` over every pair, nothing
    else, split over `processes` forked workers (the pool is started before the clock)."""
    _LOOP.update(level=cfg["level"],
                 pool=[row["text"].encode() for row in read_rows(Path(cfg["pool"]))],
                 targets=[row["text"].encode() for row in read_rows(Path(cfg["target"]))])
    n, procs = len(_LOOP["pool"]), cfg["processes"]
    step = max(1, n // (procs * 16))
    chunks = [(start, min(start + step, n)) for start in range(0, n, step)]
    with multiprocessing.get_context("fork").Pool(procs) as workers:
        workers.map(abs, range(procs))  # every worker is up before timing starts
        began = time.perf_counter()
        workers.map(_zlib_chunk, chunks, chunksize=1)
        seconds = time.perf_counter() - began
    pairs = n * len(_LOOP["targets"])
    return {"pairs": pairs, "seconds": seconds, "pairs_per_s": pairs / seconds,
            "processes": procs}


WORKERS = {"dsir-reference": worker_dsir_reference, "zipfit-reference": worker_zipfit_reference,
           "zlib-loop": worker_zlib_loop}


# --------------------------------------------------------------------------- checks


def compressed_length(compressor: str, level: int):
    if compressor == "gzip":
        return lambda data: len(gzip.compress(data, compresslevel=level))
    import lz4.frame

    return lambda data: len(lz4.frame.compress(data, compression_level=level))


def formula_check(scores_path: str, pool: list[str], target: list[str], *, compressor: str,
                  level: int, rows: int, seed: int) -> dict:
    """Recompute `1 - mean_j NCD(x, y_j)` for random pool rows with the compressor called
    directly and compare with peftune's scores.npy (one float64 per pool row)."""
    scores = np.load(scores_path)
    if scores.shape != (len(pool),):
        return {"rows": 0, "max_abs_diff": math.inf,
                "problem": f"scores.npy has shape {scores.shape}, expected ({len(pool)},)"}
    size = compressed_length(compressor, level)
    ys = [text.encode() for text in target]
    c_ys = [size(y) for y in ys]
    picked = sorted(random.Random(seed).sample(range(len(pool)), min(rows, len(pool))))
    worst = 0.0
    for i in picked:
        x = pool[i].encode()
        c_x = size(x)
        distances = [(size(x + y) - min(c_x, c_y)) / max(c_x, c_y)
                     for y, c_y in zip(ys, c_ys, strict=True)]
        worst = max(worst, abs(1.0 - math.fsum(distances) / len(distances) - float(scores[i])))
    return {"rows": len(picked), "targets": len(ys), "max_abs_diff": worst}


class KLScorer:
    """peftune's KL reduction (`peftune.select.kl`) over its hashed n-grams, with the target
    and raw-pool counts computed once for every selection scored."""

    def __init__(self, pool: list[str], target: list[str]):
        from peftune.select.kl import kl_reduction
        from peftune.select.ngrams import NgramHasher

        self._reduction = kl_reduction
        self._hasher = NgramHasher(buckets=10_000, ngrams=2, hash="sha256")
        began = time.perf_counter()
        self.target_counts = self._hasher.counts(target)
        self.raw_counts = self._hasher.counts(pool)
        self.seconds = time.perf_counter() - began

    def reduction(self, selected: list[str]) -> float:
        return self._reduction(self.target_counts, self.raw_counts, self._hasher.counts(selected))


def verdict(name: str, value: float | None, target: float | None = None) -> dict:
    """The verdict of TARGETS[name] on `value`, against `target` where given."""
    what, op, default = TARGETS[name]
    return benchlib.verdict(what, value, op, default if target is None else target)


def output_problems(out: Path, pool: str, report: dict, k: int) -> list[str]:
    """What is wrong with a select-data output directory: selected.jsonl must be k lines
    of the pool, byte for byte and in pool order; scores.npy one float64 per pool row;
    report.json's keys present and its selected-label counts those of selected.jsonl."""
    pool_lines = Path(pool).read_bytes().splitlines(keepends=True)
    problems = [f"report.json lacks {key}"
                for key in missing_report_keys(report, report.get("method"))]
    selected = (out / "selected.jsonl").read_bytes().splitlines(keepends=True)
    if len(selected) != k:
        problems.append(f"selected.jsonl has {len(selected)} lines, expected k={k}")
    position = 0
    for line in selected:
        while position < len(pool_lines) and pool_lines[position] != line:
            position += 1
        if position == len(pool_lines):
            problems.append("selected.jsonl is not the pool's lines, byte for byte, in pool "
                            "order")
            break
        position += 1
    scores = np.load(out / "scores.npy")
    if scores.dtype != np.float64 or scores.shape != (len(pool_lines),):
        problems.append(f"scores.npy is {scores.dtype} {scores.shape}, expected float64 "
                        f"({len(pool_lines)},)")
    counts: dict[str, int] = {}
    for line in selected:
        value = str(json.loads(line)["label"])
        counts[value] = counts.get(value, 0) + 1
    reported = (report.get("labels") or {}).get("selected")
    if reported is not None and reported != counts:
        problems.append("report.json labels.selected differs from selected.jsonl's labels")
    return [f"{out.name}: {problem}" for problem in problems]


def missing_report_keys(report: dict, method: str) -> list[str]:
    """The keys of peftune's report.json this benchmark relies on that are absent."""
    wanted = ["pool_size", "k", "timings.total", "docs_per_s", "kl.target_vs_raw",
              "kl.target_vs_selected", "kl.target_vs_random", "kl.reduction",
              "kl.random_reduction", "labels.pool", "labels.selected"]
    if method == "zipfit":
        wanted.append("pairs_per_s")
    missing = []
    for key in wanted:
        node = report
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            missing.append(key)
    return missing


# --------------------------------------------------------------------------- DSIR


def bench_dsir(inputs: dict, texts: dict, cfg: dict, *, work: Path, env: dict,
               kl: KLScorer | None, notes: list[str]) -> dict:
    files, label, k, procs = inputs["files"], cfg["target_label"], cfg["k"], cfg["dsir_procs"]
    pool_size = len(texts["pool"])
    word_punct = re.compile(r"\w+|[^\w\s]+")  # the reference's tokenizer's rule
    short = sum(len(word_punct.findall(text)) < 100 for text in texts["pool"]) / pool_size
    print(f"\nDSIR: pool {pool_size:,}, target {len(texts['target']):,} '{label}' documents, "
          f"k {k:,}, {procs} processes each; both keep documents of any length (the "
          f"reference's min_example_length=0: its default of 100 tokens would drop "
          f"{short:.1%} of this pool)")
    out = work / "dsir-peftune"
    lacking = benchlib.missing_modules(REFERENCE_MODULES["data-selection"])
    have_reference = not lacking
    if lacking:
        notes.append(f"data-selection cannot run here (missing: {', '.join(lacking)}): the "
                     "DSIR comparison is skipped")

    def reference_run(min_length: int):
        config = {"pool": files["pool"], "target": files["target"], "k": k, "num_proc": procs,
                  "min_length": min_length, "seed": cfg["seed"],
                  "cache_dir": str(work / "dsir-ref-cache"),
                  "out_dir": str(work / f"dsir-ref-{min_length}")}
        return lambda tag: run_worker_child(
            f"data-selection HashedNgramDSIR (min length {min_length}){tag}", "dsir-reference",
            config, work=work, env=env)

    runs = {"peftune": (lambda tag: run_peftune(
        f"peftune select-data --method dsir{tag}", method="dsir", pool=files["pool"],
        target=files["target"], k=k, out=out, procs=procs, env=env),
        lambda run: run["wall_seconds"])}
    if have_reference:
        runs["reference"] = (reference_run(0), lambda run: run["timings"]["total"])
    best = benchlib.interleaved(runs, cfg["repeats"])
    eligible = round((1 - short) * pool_size)
    if have_reference and cfg["ref_default_min_length"] and eligible < k:
        notes.append(f"data-selection with its default min length of 100 tokens is not run: "
                     f"only {eligible:,} pool documents are that long, fewer than k={k:,}")
    elif have_reference and cfg["ref_default_min_length"]:
        best["reference_min_length_100"] = reference_run(100)("")

    run, rows = best["peftune"], read_rows(out / "selected.jsonl")
    report = run["report"]
    peftune = {
        "wall_seconds": run["wall_seconds"], "repeat_seconds": run["repeat_seconds"],
        "peak_rss_bytes": run["peak_rss_bytes"], "docs_per_s": pool_size / run["wall_seconds"],
        "timings": report.get("timings"), "report_docs_per_s": report.get("docs_per_s"),
        "selected": len(rows), "precision": precision([row["label"] for row in rows], label),
        "report_kl": report.get("kl"), "report_labels_selected":
            (report.get("labels") or {}).get("selected"),
        "output_problems": output_problems(out, files["pool"], report, k),
    }
    if kl is not None:
        peftune["kl_reduction"] = kl.reduction([row["text"] for row in rows])
        reported = (report.get("kl") or {}).get("reduction")
        if reported is not None and abs(reported - peftune["kl_reduction"]) > 1e-9:
            notes.append(f"peftune's report.json says KL reduction {reported:.6f}, its own "
                         f"kl_reduction over selected.jsonl gives {peftune['kl_reduction']:.6f}")
    in_pool = sum(row["label"] == label for row in read_rows(Path(files["pool"])))
    result = {"peftune": peftune, "target_label_in_pool": in_pool,
              "pool_share_under_100_tokens": short,
              "precision_random": in_pool / pool_size, "precision_max": min(1.0, in_pool / k)}
    for name in ("reference", "reference_min_length_100"):
        if name not in best:
            continue
        ref = best[name]
        rows = [row for path in ref["selected_files"] for row in read_rows(Path(path))]
        seconds = ref["timings"]["total"]
        result[name] = {
            "min_example_length": 0 if name == "reference" else 100, "seconds": seconds,
            "repeat_seconds": ref.get("repeat_seconds", [seconds]),
            "process_wall_seconds": ref["wall_seconds"], "peak_rss_bytes": ref["peak_rss_bytes"],
            "docs_per_s": pool_size / seconds, "timings": ref["timings"], "selected": len(rows),
            "precision": precision([row["label"] for row in rows], label),
            "kl_reduction": kl.reduction([row["text"] for row in rows]) if kl else None,
        }
    if "reference" not in result:
        return result
    ref = result["reference"]
    result["ratios"] = {
        "speedup": ref["seconds"] / peftune["wall_seconds"],
        # like for like: both whole processes; both in-process compute (peftune's report)
        "speedup_process_walls": ref["process_wall_seconds"] / peftune["wall_seconds"],
        "speedup_in_process": ref["seconds"] / report["timings"]["total"],
        "kl_reduction_diff": (peftune["kl_reduction"] - ref["kl_reduction"]) if kl else None,
        "precision_diff": peftune["precision"] - ref["precision"],
    }
    return result


def bench_dsir_long(texts: dict, cfg: dict, *, work: Path, env: dict,
                    kl: KLScorer | None, notes: list[str]) -> dict | None:
    """The same text as longer documents: every `group` consecutive pool documents joined
    into one (20,000 documents of ~1,200 characters from the 200,000-document pool). Per
    n-gram costs then outweigh per-document ones, as on most real corpora. Speed and KL
    reduction only (a joined document mixes labels)."""
    if benchlib.missing_modules(REFERENCE_MODULES["data-selection"]):
        return None
    group, k = cfg["long_group"], max(1, cfg["k"] // cfg["long_group"])
    pool = ["\n".join(texts["pool"][i:i + group]) for i in range(0, len(texts["pool"]), group)]
    path = work / "long_pool.jsonl"
    write_rows(path, [("mixed", text) for text in pool])
    target = str(work.parent / "inputs" / "target.jsonl")
    print(f"\nDSIR on long documents: {len(pool):,} documents of "
          f"{sum(map(len, pool)) / len(pool):,.0f} characters (each {group} consecutive pool "
          f"documents), k {k:,}")
    out = work / "dsir-long-peftune"
    config = {"pool": str(path), "target": target, "k": k, "num_proc": cfg["dsir_procs"],
              "min_length": 0, "seed": cfg["seed"], "cache_dir": str(work / "dsir-long-cache"),
              "out_dir": str(work / "dsir-long-ref")}
    runs = {
        "peftune": (lambda tag: run_peftune(
            f"peftune select-data --method dsir, long documents{tag}", method="dsir",
            pool=str(path), target=target, k=k, out=out, procs=cfg["dsir_procs"], env=env),
            lambda run: run["report"]["timings"]["total"]),
        "reference": (lambda tag: run_worker_child(
            f"data-selection HashedNgramDSIR, long documents{tag}", "dsir-reference", config,
            work=work, env=env), lambda run: run["timings"]["total"])}
    best = benchlib.interleaved(runs, cfg["repeats"])
    ours, ref = best["peftune"], best["reference"]
    result = {"documents": len(pool), "mean_chars": sum(map(len, pool)) / len(pool), "k": k,
              "peftune": {"seconds": ours["report"]["timings"]["total"],
                          "wall_seconds": ours["wall_seconds"],
                          "peak_rss_bytes": ours["peak_rss_bytes"]},
              "reference": {"seconds": ref["timings"]["total"],
                            "process_wall_seconds": ref["wall_seconds"],
                            "peak_rss_bytes": ref["peak_rss_bytes"]}}
    if kl is not None:
        chosen = [row["text"] for row in read_rows(out / "selected.jsonl")]
        theirs = [row["text"] for p in ref["selected_files"] for row in read_rows(Path(p))]
        result["peftune"]["kl_reduction"] = kl.reduction(chosen)
        result["reference"]["kl_reduction"] = kl.reduction(theirs)
    result["speedup_in_process"] = result["reference"]["seconds"] / result["peftune"]["seconds"]
    result["speedup_process_walls"] = (result["reference"]["process_wall_seconds"]
                                       / result["peftune"]["wall_seconds"])
    return result


# --------------------------------------------------------------------------- ZIP-FIT


def scoring_seconds(report: dict) -> float:
    """The seconds of peftune's scoring phase (compressing the pool rows and every pair)."""
    return float(report["timings"]["score"])


def zipfit_run(name: str, *, pool: str, target: str, n_pool: int, n_target: int,
               compressor: str, level: int, k: int, out: Path, cfg: dict, env: dict) -> dict:
    run = run_peftune(name, method="zipfit", pool=pool, target=target, k=k, out=out,
                      procs=cfg["procs"], env=env,
                      extra=("--compressor", compressor, "--level", str(level)))
    report = run["report"]
    pairs = n_pool * n_target
    seconds = scoring_seconds(report)
    return {"pool": n_pool, "targets": n_target, "pairs": pairs, "k": k,
            "wall_seconds": run["wall_seconds"], "peak_rss_bytes": run["peak_rss_bytes"],
            "scoring_seconds": seconds, "pairs_per_s": pairs / seconds,
            "wall_pairs_per_s": pairs / run["wall_seconds"],
            "wall_docs_per_s": n_pool / run["wall_seconds"],
            "report_pairs_per_s": report.get("pairs_per_s"), "timings": report.get("timings"),
            "scores": str(out / "scores.npy"), "selected": str(out / "selected.jsonl"),
            "output_problems": output_problems(out, pool, report, k)}


def bench_zipfit(inputs: dict, texts: dict, cfg: dict, *, work: Path, env: dict,
                 kl: KLScorer | None, notes: list[str]) -> dict:
    files, procs, rows = inputs["files"], cfg["procs"], cfg["formula_rows"]
    n_pool, n_target = len(texts["pool"]), len(texts["target"])
    result: dict = {}
    print(f"\nZIP-FIT: {procs} processes each")
    by_scoring, by_loop = (lambda run: run["scoring_seconds"]), (lambda run: run["seconds"])

    # (a) gzip: peftune vs the raw zlib loop over the same pairs
    gzip_level, g_pool, g_target = cfg["gzip_level"], cfg["gzip_pool"], cfg["gzip_targets"]
    best = benchlib.interleaved({
        "peftune": (lambda tag: zipfit_run(
            f"peftune zipfit gzip-{gzip_level} {g_pool:,} x {g_target}{tag}",
            pool=files["gzip_pool"], target=files["gzip_target"], n_pool=g_pool,
            n_target=g_target, compressor="gzip", level=gzip_level, k=max(1, g_pool // 10),
            out=work / "zipfit-gzip", cfg=cfg, env=env), by_scoring),
        "zlib_loop": (lambda tag: run_worker_child(
            f"raw zlib.compress(x + y, {gzip_level}) loop{tag}", "zlib-loop",
            {"pool": files["gzip_pool"], "target": files["gzip_target"], "level": gzip_level,
             "processes": procs}, work=work, env=env), by_loop),
    }, cfg["repeats"])
    peftune, loop = best["peftune"], best["zlib_loop"]
    check = formula_check(peftune["scores"], texts["pool"][:g_pool], texts["target"][:g_target],
                          compressor="gzip", level=gzip_level, rows=rows, seed=cfg["seed"])
    result["gzip"] = {"level": gzip_level, "peftune": peftune, "zlib_loop": loop,
                      "formula_check": check,
                      "ratio_vs_zlib_loop": peftune["pairs_per_s"] / loop["pairs_per_s"]}

    if not benchlib.importable("lz4"):
        notes.append("lz4 is not installed: the lz4 comparison and the scale test are skipped")
        return result
    # (b) lz4: peftune on the full pool; the reference on a sub-sample, extrapolated
    level, l_target, r_pool = cfg["lz4_level"], cfg["lz4_targets"], cfg["ref_pool"]
    runs = {
        "peftune": (lambda tag: zipfit_run(
            f"peftune zipfit lz4-{level} {n_pool:,} x {l_target}{tag}", pool=files["pool"],
            target=files["lz4_target"], n_pool=n_pool, n_target=l_target, compressor="lz4",
            level=level, k=cfg["k"], out=work / "zipfit-lz4", cfg=cfg, env=env), by_scoring),
        "peftune_subsample": (lambda tag: zipfit_run(
            f"peftune zipfit lz4-{level} {r_pool:,} x {l_target}{tag}", pool=files["ref_pool"],
            target=files["lz4_target"], n_pool=r_pool, n_target=l_target, compressor="lz4",
            level=level, k=max(1, r_pool // 10), out=work / "zipfit-lz4-sub", cfg=cfg,
            env=env), by_scoring),
    }
    lacking = benchlib.missing_modules(REFERENCE_MODULES["zip-fit"])
    if not lacking:
        runs["reference"] = (lambda tag: run_worker_child(
            f"zip-fit ZIPFIT lz4-{level} {r_pool:,} x {l_target}{tag}", "zipfit-reference",
            {"pool": files["ref_pool"], "target": files["lz4_target"], "pool_size": r_pool,
             "compressor": "lz4", "level": level, "out_file": str(work / "zipfit-ref.jsonl"),
             "scores": str(work / "zipfit-ref-scores.npy")}, work=work, env=env),
            lambda run: run["timings"]["rank"])
    else:
        notes.append(f"zip-fit cannot run here (missing: {', '.join(lacking)}): the ZIP-FIT "
                     "reference comparison is skipped")
    lz4: dict = {"level": level, **benchlib.interleaved(runs, cfg["repeats"])}
    selected = read_rows(Path(lz4["peftune"]["selected"]))
    lz4["peftune"]["precision"] = precision([row["label"] for row in selected],
                                            cfg["target_label"])
    if kl is not None:
        lz4["peftune"]["kl_reduction"] = kl.reduction([row["text"] for row in selected])
    lz4["formula_check"] = formula_check(
        lz4["peftune"]["scores"], texts["pool"], texts["target"][:l_target], compressor="lz4",
        level=level, rows=rows, seed=cfg["seed"])
    if "reference" in lz4:
        ref = lz4["reference"]
        ref["pairs_per_s"] = ref["pairs"] / ref["timings"]["rank"]
        full_pairs = n_pool * l_target
        ref.update(subsample=[r_pool, l_target], extrapolated_pool=n_pool,
                   extrapolated_pairs=full_pairs,
                   extrapolated_seconds=full_pairs / ref["pairs_per_s"],
                   extrapolated_peak_rss_bytes=reference_rss(ref, full_pairs))
        mine = np.load(lz4["peftune_subsample"]["scores"])
        theirs = np.load(work / "zipfit-ref-scores.npy")
        lz4["reference_scores_max_abs_diff"] = float(np.max(np.abs(mine - theirs)))
        lz4["ratio_vs_reference"] = lz4["peftune"]["pairs_per_s"] / ref["pairs_per_s"]
        lz4["ratio_vs_reference_same_subsample"] = (lz4["peftune_subsample"]["pairs_per_s"]
                                                    / ref["pairs_per_s"])
    result["lz4"] = lz4

    # (c) scale: the full pool x the full target; memory must grow with the pool only
    if cfg["scale_test"]:
        scale = zipfit_run(f"peftune zipfit lz4-{level} {n_pool:,} x {n_target:,} (scale)",
                           pool=files["pool"], target=files["target"], n_pool=n_pool,
                           n_target=n_target, compressor="lz4", level=level, k=cfg["k"],
                           out=work / "zipfit-scale", cfg=cfg, env=env)
        if "reference" in lz4:
            ref = lz4["reference"]
            scale["reference_projected_peak_rss_bytes"] = reference_rss(ref, scale["pairs"])
            scale["reference_projected_seconds"] = scale["pairs"] / ref["pairs_per_s"]
        result["scale"] = scale
    return result


def reference_rss(ref: dict, pairs: int) -> float:
    """zip-fit's peak RSS projected to `pairs`: its measured tree peak plus what its main
    process grew per pair on the sub-sample, for each further pair."""
    return ref["peak_rss_bytes"] + (pairs - ref["pairs"]) * ref["bytes_per_pair"]


# --------------------------------------------------------------------------- report


def verdicts(dsir: dict | None, zipfit: dict | None) -> dict:
    out = {}
    if dsir and dsir.get("long"):
        out["dsir_speedup_long_documents"] = verdict("dsir_speedup_long_documents",
                                                     dsir["long"]["speedup_in_process"])
    if dsir and "ratios" in dsir:
        ratios, ref = dsir["ratios"], dsir["reference"]
        # Like for like: both in-process times (peftune's report.json total; the reference's
        # fit + weights + resample), neither counting interpreter start-up and imports.
        out["dsir_speedup"] = verdict("dsir_speedup", ratios["speedup_in_process"])
        kl_margin = (-KL_RELATIVE_TOLERANCE * abs(ref["kl_reduction"])
                     if ref["kl_reduction"] is not None else None)
        out["dsir_kl_reduction"] = verdict("dsir_kl_reduction", ratios["kl_reduction_diff"],
                                           kl_margin)
        out["dsir_precision"] = verdict("dsir_precision", ratios["precision_diff"])
    if zipfit:
        gz = zipfit["gzip"]
        out["zipfit_formula_gzip"] = verdict("zipfit_formula_gzip",
                                             gz["formula_check"]["max_abs_diff"])
        out["zipfit_gzip_vs_zlib_loop"] = verdict("zipfit_gzip_vs_zlib_loop",
                                                  gz["ratio_vs_zlib_loop"])
        lz4 = zipfit.get("lz4", {})
        if "formula_check" in lz4:
            out["zipfit_formula_lz4"] = verdict("zipfit_formula_lz4",
                                                lz4["formula_check"]["max_abs_diff"])
        if "reference" in lz4:
            out["zipfit_vs_reference_scores"] = verdict("zipfit_vs_reference_scores",
                                                        lz4["reference_scores_max_abs_diff"])
            out["zipfit_lz4_vs_reference"] = verdict("zipfit_lz4_vs_reference",
                                                     lz4["ratio_vs_reference"])
        if "scale" in zipfit:
            out["zipfit_scale_rss"] = verdict("zipfit_scale_rss",
                                              zipfit["scale"]["peak_rss_bytes"] / GB)
    return out


def _num(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_dsir(dsir: dict, label: str) -> None:
    header = (f"{'DSIR system':<38}{'time s':>9}{'docs/s':>10}{'peak RSS MiB':>14}"
              f"{'precision':>11}{'KL reduction':>14}")
    print("\n" + header + "\n" + "-" * len(header))
    rows = [("peftune select-data (CLI wall)", dsir["peftune"], "wall_seconds")]
    for key, name in (("reference", "data-selection, min length 0"),
                      ("reference_min_length_100", "data-selection, min length 100")):
        if key in dsir:
            rows.append((name, dsir[key], "seconds"))
    for name, s, seconds in rows:
        print(f"{name:<38}{s[seconds]:>9.1f}{s['docs_per_s']:>10,.0f}"
              f"{s['peak_rss_bytes'] / MiB:>14,.0f}{s['precision']:>11.3f}"
              f"{_num(s.get('kl_reduction'), '.4f'):>14}")
    print(f"(precision: share of the selected documents labelled '{label}': "
          f"{dsir['precision_random']:.3f} for a random subset, at most "
          f"{dsir['precision_max']:.3f} with {dsir['target_label_in_pool']:,} in the pool; the "
          "reference's time is fit + weights + resample in its process, peftune's the whole "
          "CLI run, start-up included)")
    random_reduction = (dsir["peftune"].get("report_kl") or {}).get("random_reduction")
    if random_reduction is not None:
        print(f"(KL reduction of a random subset of k, from peftune's report: "
              f"{random_reduction:.4f})")
    if "ratios" in dsir:
        r = dsir["ratios"]
        print(f"(speed-up {r['speedup']:.2f}x; whole process vs whole process "
              f"{r['speedup_process_walls']:.2f}x; in-process compute, peftune's report.json "
              f"total, {r['speedup_in_process']:.2f}x)")
    if dsir.get("long"):
        r = dsir["long"]
        print(f"(long documents, {r['documents']:,} of {r['mean_chars']:,.0f} characters: "
              f"peftune {r['peftune']['seconds']:.1f}s, reference {r['reference']['seconds']:.1f}s "
              f"in-process, {r['speedup_in_process']:.2f}x; whole processes "
              f"{r['speedup_process_walls']:.2f}x; KL reduction "
              f"{_num(r['peftune'].get('kl_reduction'), '.4f')} vs "
              f"{_num(r['reference'].get('kl_reduction'), '.4f')})")
    if "reference_min_length_100" in dsir:
        r = dsir["reference_min_length_100"]
        print(f"(with its default min length of 100 tokens the reference selected "
              f"{r['selected']:,} documents)")


def print_zipfit(zipfit: dict, label: str) -> None:
    header = (f"{'ZIP-FIT run':<44}{'pairs':>13}{'time s':>9}{'docs/s':>10}{'pairs/s':>12}"
              f"{'peak RSS MiB':>14}")
    print("\n" + header + "\n" + "-" * len(header))

    def line(name, pool, pairs, seconds, rss, mark=""):
        print(f"{name:<44}{pairs:>13,}{seconds:>9.1f}{pool / seconds:>10,.0f}"
              f"{pairs / seconds:>12,.0f}{_num(rss and rss / MiB, ',.0f'):>14}{mark}")

    def peftune(name, run):
        line(f"{name} peftune {run['pool']:,} x {run['targets']:,}", run["pool"], run["pairs"],
             run["scoring_seconds"], run["peak_rss_bytes"])

    gz = zipfit["gzip"]
    peftune(f"gzip-{gz['level']}", gz["peftune"])
    loop = gz["zlib_loop"]
    line(f"gzip-{gz['level']} raw zlib loop, {loop['processes']} processes",
         gz["peftune"]["pool"], loop["pairs"], loop["seconds"], loop["peak_rss_bytes"])
    lz4 = zipfit.get("lz4")
    if lz4:
        lv = lz4["level"]
        peftune(f"lz4-{lv}", lz4["peftune"])
        peftune(f"lz4-{lv}", lz4["peftune_subsample"])
        if "reference" in lz4:
            r = lz4["reference"]
            (pool, targets), full = r["subsample"], r["extrapolated_pool"]
            line(f"lz4-{lv} zip-fit {pool:,} x {targets}", pool, r["pairs"],
                 r["timings"]["rank"], r["peak_rss_bytes"])
            line(f"lz4-{lv} zip-fit {full:,} x {targets}", full, r["extrapolated_pairs"],
                 r["extrapolated_seconds"], r["extrapolated_peak_rss_bytes"], "  extrapolated")
    scale = zipfit.get("scale")
    if scale:
        peftune(f"lz4-{lz4['level']} scale:", scale)
        if "reference_projected_peak_rss_bytes" in scale:
            line(f"lz4-{lz4['level']} scale: zip-fit {scale['pool']:,} x {scale['targets']:,}",
                 scale["pool"], scale["pairs"], scale["reference_projected_seconds"],
                 scale["reference_projected_peak_rss_bytes"], "  extrapolated")
    print("(time: peftune's scoring phase from its report.json, its whole-CLI wall times are in "
          "the JSON; the zlib loop's pairs only; zip-fit's rank_sequences_by_alignment)")
    if lz4 and "reference" in lz4:
        r = lz4["reference"]
        print(f"(zip-fit: measured on the first {r['subsample'][0]:,} documents of the pool and "
              f"extrapolated linearly in pairs; its main process grew by "
              f"{r['bytes_per_pair']:.0f} bytes per pair; on that same sub-sample peftune is "
              f"{lz4['ratio_vs_reference_same_subsample']:.2f}x faster)")
    if lz4:
        p = lz4["peftune"]
        print(f"(peftune's lz4 selection of {p['k']:,} from {p['pool']:,}: precision "
              f"{p['precision']:.3f} for '{label}', KL reduction "
              f"{_num(p.get('kl_reduction'), '.4f')})")


def print_verdicts(checks: dict) -> None:
    print()
    for item in checks.values():
        shown = "" if item["target"] is None else f"{item['comparison']} {item['target']:.4g}"
        print(benchlib.verdict_line(item, width=54, value=f"{_num(item['value'], '.4g'):>12}",
                                    target=f"{shown:<10}"))


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pool-size", type=int, help="pool documents (default 200,000)")
    parser.add_argument("--target-size", type=int,
                        help="held-out target documents; the scale test uses all (default 1,000)")
    parser.add_argument("--k", type=int, help="documents to select (default 10,000)")
    parser.add_argument("--target-label", default="docs",
                        help="label of the target (default docs: the pydoc prose)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dsir-procs", type=int, default=2,
                        help="processes for both DSIR implementations (default 2)")
    parser.add_argument("--procs", type=int, default=os.cpu_count() or 1,
                        help="processes for ZIP-FIT and the zlib loop (default: all cores)")
    parser.add_argument("--gzip-level", type=int, default=1)
    parser.add_argument("--lz4-level", type=int, default=0,
                        help="lz4 frame level (default 0, its fast mode, the reference's default)")
    parser.add_argument("--ref-pool", type=int,
                        help="pool sub-sample the zip-fit reference is measured on "
                             "(default 20,000)")
    parser.add_argument("--no-scale-test", dest="scale_test", action="store_false",
                        help="skip peftune ZIP-FIT on the full pool x the full target")
    parser.add_argument("--ref-default-min-length", action="store_true",
                        help="also run data-selection with its default 100-token minimum")
    parser.add_argument("--repeats", type=int,
                        help="runs of each compared system, interleaved; the fastest counts "
                             "(default 2, 1 with --quick; the scale test runs once)")
    parser.add_argument("--only", choices=("dsir", "zipfit"), help="run one half only")
    parser.add_argument("--long-group", type=int, default=10,
                        help="DSIR also on documents of this many pool documents joined "
                             "(1: skip; default 10)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for the smoke test")
    parser.add_argument("--workdir", type=Path,
                        help="inputs and outputs (default runs/bench/select, or select-quick)")
    parser.add_argument("--out", type=Path, help="the JSON report (default "
                        "runs/bench/bench_select.json, or bench_select.json in --workdir)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = WORKERS[args.worker](json.loads(args.config.read_text()))
        args.result.write_text(json.dumps(result))
        return 0

    began = time.perf_counter()
    sizes = dict(QUICK if args.quick else FULL)
    for key in ("pool_size", "target_size", "k", "ref_pool"):
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    for key in ("gzip_pool", "ref_pool"):
        sizes[key] = min(sizes[key], sizes["pool_size"])
    for key in ("gzip_targets", "lz4_targets"):
        sizes[key] = min(sizes[key], sizes["target_size"])
    if sizes["k"] >= sizes["pool_size"]:
        parser.error(f"--k must be smaller than --pool-size, got {sizes['k']} >= "
                     f"{sizes['pool_size']}")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.gzip_level < 1:
        parser.error("--gzip-level must be >= 1: level 0 stores without compressing")
    default_dir = Path("runs/bench/select-quick" if args.quick else "runs/bench/select")
    workdir = args.workdir or default_dir
    out_path = args.out or (workdir / "bench_select.json" if args.workdir else
                            Path("runs/bench/bench_select_quick.json" if args.quick
                                 else "runs/bench/bench_select.json"))
    cfg = {**sizes, "target_label": args.target_label, "seed": args.seed,
           "dsir_procs": args.dsir_procs, "procs": args.procs, "gzip_level": args.gzip_level,
           "lz4_level": args.lz4_level, "scale_test": args.scale_test,
           "ref_default_min_length": args.ref_default_min_length, "quick": args.quick,
           "repeats": args.repeats or (1 if args.quick else 2),
           "long_group": 1 if args.quick else args.long_group}

    inputs = build_inputs(workdir / "inputs", sizes, target_label=args.target_label,
                          seed=args.seed)
    texts = {name: [row["text"] for row in read_rows(Path(inputs["files"][name]))]
             for name in ("pool", "target")}
    work = workdir / "runs"
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    notes: list[str] = []
    pool_labels = inputs["pool_labels"]
    in_pool = pool_labels.get(args.target_label, 0)
    print(f"pool: {len(texts['pool']):,} documents, {len(pool_labels)} labels, mean "
          f"{inputs['pool_mean_chars']:.0f} characters; '{args.target_label}' is "
          f"{in_pool:,} of them ({in_pool / len(texts['pool']):.1%}); target: "
          f"{len(texts['target']):,} held-out '{args.target_label}' documents")

    kl = None
    try:
        kl = KLScorer(texts["pool"], texts["target"])
        print(f"KL reduction: peftune.select.kl over sha256-hashed uni+bigrams, 10,000 "
              f"buckets (pool and target counted in {kl.seconds:.1f}s)")
    except ImportError as err:
        notes.append(f"peftune.select.kl is not importable ({err}): no KL reductions")

    dsir = zipfit = None
    if args.only in (None, "dsir"):
        dsir = bench_dsir(inputs, texts, cfg, work=work, env=env, kl=kl, notes=notes)
        if cfg["long_group"] > 1 and dsir is not None:
            dsir["long"] = bench_dsir_long(texts, cfg, work=work, env=env, kl=kl, notes=notes)
    if args.only in (None, "zipfit"):
        zipfit = bench_zipfit(inputs, texts, cfg, work=work, env=env, kl=kl, notes=notes)
    checks = verdicts(dsir, zipfit)
    runs = [(dsir or {}).get("peftune"), (zipfit or {}).get("gzip", {}).get("peftune"),
            (zipfit or {}).get("scale")]
    runs += [(zipfit or {}).get("lz4", {}).get(key) for key in ("peftune", "peftune_subsample")]
    for run in filter(None, runs):
        notes += [f"peftune output {problem}" for problem in run["output_problems"]]

    if cfg["repeats"] > 1:
        print(f"\n(each compared system ran {cfg['repeats']} times, interleaved in alternating "
              "order; the tables show each one's fastest run, every run's time is in the JSON)")
    if dsir:
        print_dsir(dsir, args.target_label)
    if zipfit:
        print_zipfit(zipfit, args.target_label)
    print_verdicts(checks)
    busy = benchlib.busy_note(LOADS, limit=(os.cpu_count() or 1) + 0.5, noun="times")
    if busy:
        notes.append(busy)
    for note in dict.fromkeys(notes):
        print(f"note: {note}")
    report = {
        "config": cfg, "inputs": inputs, "dsir": dsir, "zipfit": zipfit, "targets": checks,
        "notes": list(dict.fromkeys(notes)),
        "environment": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                        "load_average_1min": LOADS,
                        "memory_bytes": psutil.virtual_memory().total,
                        "packages": {name: benchlib.package_version(name) for name in
                                     ("data-selection", "zip-fit", "lz4", "numpy")}},
        "elapsed_seconds": time.perf_counter() - began,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(f"\nwrote {out_path} ({report['elapsed_seconds']:.0f}s in all)")
    return 0


if __name__ == "__main__":
    benchlib.run_main(main)
