"""What every merge flow shares: where the base's weights are on disk, the dtype it stores,
progress lines, and the way a result reaches `--out`: written into a staging directory
beside it (`staging_dir`) and moved into place only once verified (`publish_verified`), so
a failed or interrupted merge leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from huggingface_hub import snapshot_download

from peftune.errors import InputError, TrainingError
from peftune.merge import writer
from peftune.models.catalogue import looks_like_catalogue_name
from peftune.models.sources import is_gguf, resolve_model_path


def say(quiet: bool, line: str) -> None:
    if not quiet:
        print(line, flush=True)


def warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr, flush=True)


def local_model_dir(path: str) -> Path:
    """A local model directory, a GGUF file's or catalogue model's converted directory, or a
    hub id's snapshot in the local cache."""
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    if is_gguf(path) or looks_like_catalogue_name(path):
        resolved = Path(resolve_model_path(path, key="--base"))
        if resolved.is_dir():  # else a bare hub id (gpt2) the hub cache holds: below
            return resolved
    try:
        return Path(snapshot_download(path, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means: not available locally
        raise InputError(f"--base {path}: no such local model directory and not in the hub "
                         "cache; merging needs the base's weights on disk") from None


def stored_dtype(base: Path) -> str:
    """The dtype the base's config.json says its weights are stored in (float32 if unsaid);
    `--dtype auto` writes the merge in it."""
    config = json.loads((base / "config.json").read_text())
    name = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    return name if name in ("float32", "bfloat16", "float16") else "float32"


@contextlib.contextmanager
def staging_dir(out: Path, *, kind: str = "merge") -> Iterator[Path]:
    """A fresh directory beside `out` (same file system: the final rename is atomic) to write
    into, removed on every way out (`publish_verified` has moved it to `out` by then when all
    went well), and so is `out`'s parent when this made it and it is left empty."""
    tmp = out.parent / f".tmp-{kind}-{out.name}-{os.getpid()}"
    made_parent = not out.parent.exists()
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if made_parent:  # e.g. RUN/export/ of an export that failed: not left behind empty
            with contextlib.suppress(OSError):
                out.parent.rmdir()


def publish_verified(report: dict, tmp: Path, out: Path, *, failure: str | None = None) -> None:
    """The end of every merge. When `report["verification"]` failed: TrainingError(`failure`,
    by default the logit error against the tolerance) and nothing reaches `out`; otherwise
    the report goes beside the merged files as merge_report.json and `tmp` becomes `out`
    (replacing an earlier merge there)."""
    check = report["verification"]
    if not check["ok"]:
        raise TrainingError(failure or (
            f"merge verification failed: logits differ by {check['max_abs_logit_error']:.3g} "
            f"(tolerance {check['tolerance']:g}); nothing was written to {out}"))
    (tmp / writer.REPORT).write_text(json.dumps(report, indent=2) + "\n")
    writer.publish(tmp, out)
