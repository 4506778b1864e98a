"""`data.select` in a training recipe: select from `data.train` first, then train on the
selection. The selection is cached by content (the pool's and targets' bytes and every key
that changes the result), so a second run with the same inputs does not select again."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from peftune.data.cache import default_cache_dir, source_fingerprint
from peftune.data.sources import resolve_source
from peftune.errors import InputError
from peftune.recipe.schema import DataSection
from peftune.select.config import SelectConfig

SELECT_FORMAT_VERSION = 1  # bumped whenever the same inputs would select other rows
_INHERITED = ("format", "text_field", "prompt_field", "input_field", "response_field",
              "messages_field", "prompt_template", "on_bad_row")
_NOT_IN_KEY = frozenset({"pool", "target", "out", "num_proc"})


def training_selection(data: DataSection) -> SelectConfig:
    """The SelectConfig of `data.select`: its pool is data.train, and it scores the text the
    data section trains on unless `data.select` names its own fields."""
    if data.is_mix:  # a recipe refuses this on loading (DataSection.mix_problems)
        raise InputError(f"data.select: selection picks rows from one pool, and data.train is "
                         f"a mix of {len(data.train)} sources; run `peftune select-data` on "
                         "the pool and give its selected.jsonl as one source of the mix")
    values = dict(data.select or {})
    for key in _INHERITED:
        values.setdefault(key, getattr(data, key))
    values["pool"] = [data.train]
    return SelectConfig.model_validate(values)


def cache_dir_for(cfg: SelectConfig) -> Path:
    digest = hashlib.sha256()
    settings = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in _NOT_IN_KEY}
    digest.update(json.dumps([SELECT_FORMAT_VERSION, settings], sort_keys=True).encode())
    for key, paths in (("select.pool", cfg.pool), ("data.select.target", cfg.target)):
        for path in paths:
            digest.update(source_fingerprint(resolve_source(path, key=key)).encode())
    return default_cache_dir().parent / "selected" / digest.hexdigest()[:32]


def select_for_training(data: DataSection, *, quiet: bool = False) -> tuple[DataSection, dict]:
    """The data section to train on (data.train replaced by the selected rows) and the
    selection's report."""
    from peftune.select.runner import run_select

    cfg = training_selection(data)
    out = cache_dir_for(cfg)
    report_path = out / "report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
        report["cached"] = True
    else:
        report = run_select(cfg, out=out, quiet=quiet, key="data.select", pool_key="data.train")
        report["cached"] = False
    report["dir"] = str(out)
    selected = data.model_copy(update={"train": str(out / "selected.jsonl"), "select": None})
    return selected, report
