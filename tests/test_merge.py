"""`peftune merge` of one adapter: exact ΔW merges (LoRA, DoRA, a residual init, a native
method), a QLoRA run merged into the original fp32 weights, streaming over a sharded base,
full/freeze runs, verification, and every refusal (exit 2, one line, nothing written)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import IDS, fp32_base, logits_of, merge_in_process, run_cli, run_python, write_recipe

from peftune.errors import InputError, TrainingError
from peftune.merge.runner import run_merge
from peftune.recipe import load_recipe

ROWS = {"lora": {"r": 4}, "dora": {"r": 4}, "pissa": {"r": 4}, "sora": {"r": 4, "sparsity": 1.0},
        "hydra": {"r": 4}, "prompt": {"num_virtual_tokens": 4}, "full": {}}


def train_run(tmp: Path, model: Path, data: Path, method: str, *, quant: str = "none",
              steps: int = 4) -> Path:
    from peftune.train.run import run_train

    sections: dict = {"adapter": {"method": method, **ROWS[method]},
                      "train": {"max_steps": steps, "lr": 2e-3 if method == "full" else 2e-2}}
    if quant != "none":
        sections["quant"] = {"method": quant, "compute_dtype": "float32"}
    out = tmp / f"run-{method}-{quant}"
    path = write_recipe(tmp / f"{method}-{quant}.yaml", model=model, data=data, out=out, **sections)
    if method == "prompt":
        path.write_text(path.read_text().replace("max_length: 64", "max_length: 64\n  packing: false"))
    run_train(load_recipe(path), quiet=True)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, text_data) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("merge-runs")
    made = {m: train_run(tmp, tiny_model_dir, text_data["train"], m) for m in ROWS}
    made["nf4"] = train_run(tmp, tiny_model_dir, text_data["train"], "lora", quant="nf4")
    return made


def base_plus_adapter(base: Path, adapter: Path) -> torch.Tensor:
    from peft import PeftModel

    return logits_of(PeftModel.from_pretrained(fp32_base(base), str(adapter)))


@pytest.mark.parametrize("method", ["lora", "dora", "pissa", "sora", "hydra"])
def test_merged_logits_equal_base_plus_adapter(tmp_path, runs, tiny_model_dir, method):
    out = tmp_path / "merged"
    report = run_merge(target=str(runs[method]), out=out, quiet=True)
    merged = fp32_base(out)  # transformers alone loads it
    expected = base_plus_adapter(tiny_model_dir, runs[method] / "adapter")
    torch.testing.assert_close(logits_of(merged), expected, rtol=0, atol=1e-5)
    # it changed
    assert (logits_of(merged) - logits_of(fp32_base(tiny_model_dir))).abs().max() > 1e-3
    saved = json.loads((out / "merge_report.json").read_text())
    assert saved["modules_changed"] == report["modules_changed"] == 14  # 7 linears x 2 layers
    assert saved["verification"]["ok"] and saved["relative_delta_norm"] > 0
    assert saved["mode"].startswith("peft" if method == "dora" else "streaming")
    assert saved["verification"]["how"].startswith("whole models" if method == "dora"
                                                   else "module by module")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert not list(tmp_path.glob(".tmp-merge-*"))


def test_nf4_trained_lora_merges_into_the_original_fp32_weights(tmp_path, runs, tiny_model_dir,
                                                                 capsys):
    out = tmp_path / "merged"
    report = run_merge(target=str(runs["nf4"]), out=out)
    assert report["trained_over"] == "nf4"
    assert "merging into the unquantized weights" in capsys.readouterr().out
    expected = base_plus_adapter(tiny_model_dir, runs["nf4"] / "adapter")  # fp32 base, not nf4
    torch.testing.assert_close(logits_of(fp32_base(out)), expected, rtol=0, atol=1e-5)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_streaming_over_a_sharded_base_equals_the_single_file_merge(tmp_path, runs,
                                                                    tiny_model_dir):
    from safetensors.torch import load_file

    sharded = tmp_path / "sharded-base"
    fp32_base(tiny_model_dir).save_pretrained(sharded, max_shard_size="40KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (sharded / name).write_bytes((tiny_model_dir / name).read_bytes())
    assert len(list(sharded.glob("model-*.safetensors"))) >= 4
    adapter = runs["lora"] / "adapter"
    run_merge(base=str(tiny_model_dir), adapter=str(adapter), out=tmp_path / "one", quiet=True)
    report = run_merge(base=str(sharded), adapter=str(adapter), out=tmp_path / "many",
                       shard_size="40KB", quiet=True)
    assert len(report["shards"]) >= 4 and (tmp_path / "many" / "model.safetensors.index.json").is_file()
    one = load_file(tmp_path / "one" / "model.safetensors")
    many = {}
    for shard in report["shards"]:
        many.update(load_file(tmp_path / "many" / shard))
    assert set(one) == set(many)
    assert all(torch.equal(one[k], many[k]) for k in one)  # bitwise


def test_bf16_output_is_verified_with_a_looser_tolerance(tmp_path, runs):
    out = tmp_path / "bf16"
    report = run_merge(target=str(runs["lora"]), out=out, dtype="bfloat16", quiet=True)
    assert report["verification"]["tolerance"] == 3e-2 and report["verification"]["ok"]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}


def test_a_wrong_merge_fails_verification_and_leaves_nothing(tmp_path, runs, monkeypatch):
    from peftune.merge import adapter_merge

    real = adapter_merge.lazy_deltas

    def halved(lora):
        delta_of = real(lora)
        return lambda name: None if delta_of(name) is None else 0.5 * delta_of(name)

    monkeypatch.setattr(adapter_merge, "lazy_deltas", halved)
    with pytest.raises(TrainingError, match="merge verification failed"):
        run_merge(target=str(runs["lora"]), out=tmp_path / "bad", quiet=True)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".tmp-merge-*"))


Q_PROJ, O_PROJ = "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.o_proj.weight"
WRONG_DELTAS = {  # what a wrong ΔW looks like: each is caught by the check of that module
    "scale off by 1%": lambda d, name: None if d(name) is None else 1.01 * d(name),
    "transposed": lambda d, name: d(name).T.contiguous() if name in (Q_PROJ, O_PROJ) else d(name),
    "one module left out": lambda d, name: None if name == Q_PROJ else d(name),
    "added to the wrong module": lambda d, name: (d(O_PROJ) if name == Q_PROJ else
                                                  d(Q_PROJ) if name == O_PROJ else d(name)),
}


@pytest.mark.parametrize("wrong", list(WRONG_DELTAS))
def test_every_wrong_delta_is_caught_by_the_module_check(tmp_path, runs, monkeypatch, wrong):
    from peftune.merge import adapter_merge

    real = adapter_merge.lazy_deltas
    monkeypatch.setattr(adapter_merge, "lazy_deltas",
                        lambda lora: lambda name: WRONG_DELTAS[wrong](real(lora), name))
    with pytest.raises(TrainingError, match=r"merge verification failed: model\.layers\.\d\."):
        run_merge(target=str(runs["lora"]), out=tmp_path / "bad", quiet=True)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".tmp-merge-*"))


WRONG_FILES = {  # right in memory, wrong on disk: the end-to-end logits check catches it
    "an adapted weight's rows shifted": (O_PROJ, lambda t: torch.roll(t, 1, 0)),
    "a norm weight 10% off": ("model.layers.0.input_layernorm.weight", lambda t: 0.9 * t),
    "one probe token's embedding zeroed": ("model.embed_tokens.weight",
                                                lambda t: t.index_fill(0, torch.tensor([76]), 0)),
}


@pytest.mark.parametrize("dtype", ["auto", "bfloat16"])
@pytest.mark.parametrize("wrong", list(WRONG_FILES))
def test_a_wrong_written_file_fails_the_logits_check(tmp_path, runs, monkeypatch, wrong, dtype):
    from peftune.merge.stio import PlannedFile

    name, corrupt = WRONG_FILES[wrong]
    real = PlannedFile.write
    monkeypatch.setattr(PlannedFile, "write", lambda self, n, t: real(
        self, n, corrupt(t) if n == name else t))
    with pytest.raises(TrainingError, match="merged model's logits differ from base"):
        run_merge(target=str(runs["lora"]), out=tmp_path / "bad", dtype=dtype, quiet=True)
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob(".tmp-merge-*"))


def test_the_module_check_covers_every_adapted_module(tmp_path, runs):
    report = run_merge(target=str(runs["lora"]), out=tmp_path / "ok", quiet=True)
    check = report["verification"]["module_check"]
    assert check["modules_checked"] == report["modules_changed"] == 14
    assert 0 <= check["max_module_error"] < 1e-6 < check["module_tolerance"]


def test_full_runs_are_already_merged_or_copied(tmp_path, runs, capsys):
    report = run_merge(target=str(runs["full"]))
    assert report["kind"] == "already_merged"
    assert "already merged" in capsys.readouterr().out
    out = tmp_path / "copy"
    report = run_merge(target=str(runs["full"]), out=out, dtype="bfloat16", quiet=True)
    assert report["kind"] == "copy" and report["verification"]["ok"]
    torch.testing.assert_close(logits_of(fp32_base(out)),
                               logits_of(fp32_base(runs["full"] / "model")), rtol=0, atol=0.1)


def test_overwrite_replaces_only_an_earlier_merge(tmp_path, runs):
    out = tmp_path / "merged"
    run_merge(target=str(runs["lora"]), out=out, quiet=True)
    with pytest.raises(InputError, match="is not empty; pass --overwrite"):
        run_merge(target=str(runs["lora"]), out=out, quiet=True)
    run_merge(target=str(runs["sora"]), out=out, overwrite=True, quiet=True)
    assert "sora" in json.loads((out / "merge_report.json").read_text())["method"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not a merge output"):
        run_merge(target=str(runs["lora"]), out=other, overwrite=True, quiet=True)
    assert (other / "keep.txt").read_text() == "mine"


# ---- bad input: exit 2, one `error:` line, nothing written -------------------------------

@pytest.fixture(scope="module")
def zero_adapter(tmp_path_factory, tiny_model_dir) -> Path:
    """A freshly initialised LoRA: B = 0, so it changes nothing."""
    from peft import LoraConfig, get_peft_model

    out = tmp_path_factory.mktemp("zero") / "adapter"
    get_peft_model(fp32_base(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj"])) \
        .save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def wider_model(tmp_path_factory) -> Path:
    from peftune.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("wide") / "tiny48", hidden_size=48, heads=4)


@pytest.mark.parametrize(("args", "expected"), [
    (["{tmp}/nope"], "RUN_DIR {tmp}/nope: no such directory"),
    (["--base", "{base}", "--adapter", "{tmp}/nope"], "--adapter {tmp}/nope: no such directory"),
    (["--base", "{tmp}/nobase", "--adapter", "{lora}/adapter"], "--model {tmp}/nobase: no such model"),
    (["--base", "{base}"], "--base {base}: needs --adapter DIR"),
    ([], "nothing to merge: give RUN_DIR"),
    (["--base", "{wide}", "--adapter", "{lora}/adapter", "--out", "{tmp}/out"],
     "does not match the base {wide}: model.layers.0.mlp.down_proj.weight is 48x96 in the base "
     "but 32x64 in the adapter"),
    (["{prompt}", "--out", "{tmp}/out"], "adapter.method prompt is not mergeable: it prepends"),
    (["--base", "{base}", "--adapter", "{zero}", "--out", "{tmp}/out"],
     "the adapter changes nothing (every ΔW is zero"),
    (["{lora}", "--out", "{tmp}/out", "--shard-size", "lots"], "--shard-size lots: expected a size"),
    (["{lora}", "--out", "{tmp}/out", "--dtype", "int3"], "--dtype int3: choose auto"),
    (["{lora}", "--out", "{tmp}/full"], "--out {tmp}/full: is not empty; pass --overwrite"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys, runs,
                                                            tiny_model_dir, zero_adapter,
                                                            wider_model, args, expected):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    names = {"tmp": tmp_path, "base": tiny_model_dir, "lora": runs["lora"], "wide": wider_model,
             "prompt": runs["prompt"], "zero": zero_adapter}
    code, _, err = merge_in_process(monkeypatch, capsys, *[a.format(**names) for a in args])
    (line,) = err.strip().splitlines()
    assert code == 2 and line.startswith("error: ") and expected.format(**names) in line, line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-merge-*"))
    assert not (runs["lora"] / "merged").exists()


def test_noop_adapter_is_written_with_allow_noop(tmp_path, tiny_model_dir, zero_adapter, capsys):
    report = run_merge(base=str(tiny_model_dir), adapter=str(zero_adapter), out=tmp_path / "o",
                       allow_noop=True, quiet=True)
    assert report["modules_changed"] == 0 and report["warnings"]
    assert "warning: " in capsys.readouterr().err


def test_importing_the_cli_does_not_import_torch():
    code = "import sys, peftune.cli; print('torch' in sys.modules)"
    done = run_python(code, timeout=60)
    assert done.stdout.strip() == "False", done.stderr


# ---- streaming I/O and the module-by-module verification model -----------------------------

def test_planned_safetensors_files_round_trip_through_the_library(tmp_path):
    from safetensors.torch import load_file

    from peftune.merge.stio import PlannedFile, iter_tensors, read_header

    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16),
               "c": torch.tensor([True, False]), "d": torch.arange(4), "e": torch.empty(0, 3)}
    planned = PlannedFile(tmp_path / "x.safetensors",
                          [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()])
    for name, tensor in tensors.items():
        planned.write(name, tensor)
    planned.close()
    loaded = load_file(tmp_path / "x.safetensors")  # the safetensors library reads it
    assert set(loaded) == set(tensors) and all(torch.equal(loaded[k], v) for k, v in tensors.items())
    ours = dict(iter_tensors(tmp_path / "x.safetensors"))
    assert all(torch.equal(ours[k], v) for k, v in tensors.items())
    assert read_header(tmp_path / "x.safetensors")[0]["b"]["dtype"] == "BF16"
    wrong = PlannedFile(tmp_path / "y.safetensors", [("a", torch.float32, (3, 5))])
    with pytest.raises(RuntimeError, match="planned"):
        wrong.write("a", torch.randn(5, 3))


def test_lazy_model_logits_equal_the_loaded_model_and_see_the_lora_path(runs, tiny_model_dir):
    from peftune.merge.deltas import load_lora_adapter
    from peftune.merge.verify import lazy_logits, lora_forward

    rows = [IDS, IDS[:, :5]]
    full = fp32_base(tiny_model_dir)
    with torch.no_grad():
        expected = [full(input_ids=r, use_cache=False).logits for r in rows]
    got = lazy_logits(tiny_model_dir, rows)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-5)
    adapter = runs["lora"] / "adapter"
    plain, with_lora = lazy_logits(tiny_model_dir, rows, paired=True,
                                   extra=lora_forward(load_lora_adapter(adapter)))
    torch.testing.assert_close(plain[0], expected[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(with_lora[0], base_plus_adapter(tiny_model_dir, adapter),
                               rtol=0, atol=1e-5)  # the LoRA forward, as peft computes it


def test_small_work_runs_on_one_thread_and_the_count_is_restored():
    from peftune.merge.writer import PARALLEL_WORK, threads_for

    before = torch.get_num_threads()
    with threads_for(1000):
        assert torch.get_num_threads() == 1
        with threads_for(PARALLEL_WORK):  # a large model's tensor: torch's own count
            assert torch.get_num_threads() == before
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_a_fresh_process_merges_while_transformers_is_still_importing(tmp_path, runs,
                                                                       tiny_model_dir):
    """The CLI imports transformers in a thread while the merge streams; a tiny model's merge
    ends first, so the verification's own import must wait for that thread, not race it."""
    out = tmp_path / "merged"
    done = run_cli("merge", "--base", tiny_model_dir, "--adapter", runs["lora"] / "adapter",
                   "--out", out, "--quiet")
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "merge_report.json").read_text())["verification"]["ok"]


def test_the_module_check_sees_a_small_adapters_delta_halved():
    """‖ΔW‖/‖W‖ ~ 1e-5: inside the relative tolerance, but the merge must still have moved W
    most of the way to W + ΔW (a quarter of the adapter's own effect at most)."""
    from peftune.merge.deltas import LoraAdapter
    from peftune.merge.verify import ModuleCheck

    g = torch.Generator().manual_seed(0)
    lora = LoraAdapter(path=Path("x"), config={"r": 2, "lora_alpha": 2},
                       factors={"m": {"lora_A": torch.randn(2, 32, generator=g),
                                      "lora_B": torch.randn(64, 2, generator=g)}})
    weight = torch.randn(64, 32, generator=g)
    delta = lora.delta("m")
    delta *= 1e-5 * float(weight.norm() / delta.norm())
    lora.factors["m"]["lora_B"] *= float(delta.norm() / lora.delta("m").norm())
    check = ModuleCheck(lora)
    check.before("m.weight", weight)
    check.after("m.weight", weight + lora.delta("m"))  # the right merge passes
    check.before("m.weight", weight)
    with pytest.raises(TrainingError, match="m.weight: the merged weight differs"):
        check.after("m.weight", weight + 0.5 * lora.delta("m"))
