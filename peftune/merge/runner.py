"""`peftune merge`: `run_merge(*, ...)` decides what is merged and hands it to its flow.

- a merge.yaml (`config`): several LoRA adapters of one base (`multi`), or several full
  fine-tuned models of one base (`model_merge`);
- a training run directory, or `--base PATH --adapter DIR`: one adapter folded into its
  base, or a run that trained the whole model copied (`adapter_merge`).

Every flow writes into a staging directory beside `--out`, verifies the result against
base + adapter (or the merged deltas) on probe logits, and only then moves it into place
with its merge_report.json (`common.publish_verified`); nothing is left otherwise.
"""

from __future__ import annotations

from pathlib import Path

from peftune.errors import InputError
from peftune.merge.adapter_merge import merge_adapter, resolve_job
from peftune.merge.common import say
from peftune.merge.config import load_merge_config, where_text
from peftune.merge.model_merge import run_model_merge
from peftune.merge.multi import run_multi_merge
from peftune.merge.writer import check_out_dir, parse_size


def run_merge(*, target: str | None = None, base: str | None = None, adapter: str | None = None,
              out: Path | None = None, shard_size: str = "5GB", dtype: str = "auto",
              overwrite: bool = False, allow_noop: bool = False, out_rank: int | None = None,
              quiet: bool = False) -> dict:
    """Merge and verify; returns the report written to OUT/merge_report.json."""
    if target is not None and Path(target).suffix in (".yaml", ".yml"):
        return _merge_file(Path(target), out=out, shard_size=shard_size, dtype=dtype,
                           overwrite=overwrite, allow_noop=allow_noop, out_rank=out_rank,
                           quiet=quiet)
    if out_rank is not None:
        raise InputError("--out-rank re-factors a multi-adapter merge into a LoRA; it needs a "
                         "merge.yaml (peftune merge merge.yaml --out-rank N)")
    job = resolve_job(target=target, base=base, adapter=adapter)
    shard_bytes = parse_size(shard_size)
    if out is None:
        if job.run is None:
            raise InputError("--out: required with --base/--adapter (the directory to write "
                             "the merged model into)")
        if job.adapter is None:
            say(quiet, f"already merged: {job.run}/model is the full trained model (method "
                       f"{job.method}); load it with AutoModelForCausalLM.from_pretrained, "
                       "or pass --out DIR to copy it with --dtype / --shard-size")
            return {"kind": "already_merged", "model": str(Path(job.run) / "model")}
        out = Path(job.run) / "merged"
    check_out_dir(out, overwrite=overwrite)
    return merge_adapter(job, out=out, shard_bytes=shard_bytes, dtype=dtype,
                         allow_noop=allow_noop, quiet=quiet, shard_size=shard_size)


def _merge_file(config_path: Path, *, out: Path | None, shard_size: str, dtype: str,
                overwrite: bool, allow_noop: bool, out_rank: int | None, quiet: bool) -> dict:
    """A merge.yaml: the command line's --out, --out-rank, --dtype and --shard-size win over
    the file's keys (a flag left at its default leaves the file's value)."""
    config, where = load_merge_config(config_path)
    out = out or (Path(config.out) if config.out else None)
    if out is None:
        raise InputError(f"{where_text(where)}: merge.out: required (or give --out DIR): the "
                         "directory to write the merged model into")
    out_rank = out_rank or config.out_rank
    dtype = dtype if dtype != "auto" else config.dtype
    shard_size = shard_size if shard_size != "5GB" else config.shard_size
    shard_bytes = parse_size(shard_size)
    if config.models:
        if out_rank is not None:
            raise InputError(f"{where_text(where, 'models')}: --out-rank re-factors merged LoRA "
                             "deltas; merging full models writes a model")
        return run_model_merge(config, where, out=out, dtype=dtype, shard_bytes=shard_bytes,
                               overwrite=overwrite, allow_noop=allow_noop, quiet=quiet)
    return run_multi_merge(config, where, out=out, dtype=dtype, shard_bytes=shard_bytes,
                           overwrite=overwrite, allow_noop=allow_noop, out_rank=out_rank,
                           quiet=quiet)
