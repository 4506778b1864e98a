"""Multi-model merging (full fine-tunes of one base, merge.yaml `models:` + `base:`): the
streamed result against hand computations per tensor, one model at weight 1 == that model
(tensors and probe logits), slerp's formula and its linear fallback, and bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import fp32_base, logits_of, merge_in_process

from peftune.merge.combine import slerp_tensors
from peftune.merge.runner import run_merge


def read_all(path: Path) -> dict[str, torch.Tensor]:
    from peftune.merge.writer import iter_base_tensors

    return {k: v.clone() for k, v in iter_base_tensors(path)}


@pytest.fixture(scope="module")
def family(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """The tiny base saved in >= 4 shards and two 'fine-tunes' of it (perturbed weights)."""
    tmp = tmp_path_factory.mktemp("family")
    out = {}
    for i, name in enumerate(("base", "m1", "m2")):
        model = fp32_base(tiny_model_dir)
        if i:
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=g))
        model.save_pretrained(tmp / name, max_shard_size="40KB")
        for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            (tmp / name / f).write_bytes((tiny_model_dir / f).read_bytes())
        out[name] = tmp / name
    assert len(list(out["base"].glob("model-*.safetensors"))) >= 4
    return out


def merge_yaml(path: Path, **merge) -> Path:
    path.write_text(yaml.safe_dump({"merge": merge}, sort_keys=False))
    return path


def test_slerp_formula_and_parallel_fallback():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(slerp_tensors(a, b, 0.5), torch.tensor([math.sqrt(0.5)] * 2))
    torch.testing.assert_close(slerp_tensors(a, 2 * b, 1 / 3),
                               torch.tensor([math.sin(math.pi / 3), 2 * math.sin(math.pi / 6)])
                               / math.sin(math.pi / 2))
    # parallel: plain (1 − t)·a + t·b (spherical interpolation is undefined there)
    torch.testing.assert_close(slerp_tensors(torch.tensor([1.0, 1.0]), torch.tensor([2.0, 2.0]),
                                             0.5), torch.tensor([1.5, 1.5]))


def test_one_model_at_weight_one_is_that_model(tmp_path, family):
    config = merge_yaml(tmp_path / "m.yaml", method="linear", base=str(family["base"]),
                        models=[{"path": str(family["m1"])}], out=str(tmp_path / "out"))
    report = run_merge(target=str(config), shard_size="40KB", quiet=True)
    assert report["verification"]["ok"] and len(report["shards"]) >= 4
    got, want = read_all(tmp_path / "out"), read_all(family["m1"])
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits_of(fp32_base(tmp_path / "out")),
                               logits_of(fp32_base(family["m1"])), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "pcb", "slerp"])
def test_methods_on_task_vectors_match_the_hand_formula(tmp_path, family, method):
    from peftune.merge import combine
    from peftune.merge.combine import Inputs

    extra = {"task_arithmetic": {"lambda": 0.5}, "ties": {"density": 0.3}, "pcb": {"density": 0.5},
             "slerp": {"t": 0.3}}[method]
    config = merge_yaml(tmp_path / "m.yaml", method=method, base=str(family["base"]), **extra,
                        models=[{"path": str(family["m1"])}, {"path": str(family["m2"])}],
                        out=str(tmp_path / "out"))
    report = run_merge(target=str(config), quiet=True)
    assert report["verification"]["ok"] and report["modules_changed"] > 0
    base, m1, m2 = (read_all(family[n]) for n in ("base", "m1", "m2"))
    got = read_all(tmp_path / "out")
    name = "model.layers.1.mlp.up_proj.weight"
    t1, t2 = m1[name] - base[name], m2[name] - base[name]
    if method == "task_arithmetic":
        expected = base[name] + 0.5 * (t1 + t2)
    elif method == "slerp":
        expected = slerp_tensors(m1[name], m2[name], 0.3)
    else:
        d = extra["density"]
        expected = base[name] + getattr(combine, method)(
            Inputs(deltas=[t1, t2], weights=[1.0, 1.0], densities=[d, d]))
    torch.testing.assert_close(got[name], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("merge", "expected"), [
    ({"method": "slerp", "t": 0.5, "models": ["m1"]}, "merge.models: slerp interpolates exactly 2"),
    ({"method": "slerp", "t": 1.5}, "merge.t: must be <= 1, got 1.5"),
    ({"method": "slerp"}, "merge.t: required by slerp"),
    ({"method": "linear", "t": 0.5}, "merge.t: linear does not use t"),
    ({"method": "linear", "base": None}, "merge.base: required with models"),
    ({"method": "linear", "models": ["m1", "missing"]}, "merge.models[1].path: {tmp}/missing: no such"),
    ({"method": "linear", "models": ["m1", "wide"]}, "merge.models[1].path: {wide} does not match "
                                                     "merge.base: lm_head.weight is"),
    ({"method": "lora_lego", "k": 2}, "merge.models: lora_lego clusters LoRA rank units"),
])
def test_bad_model_merge_exits_2_with_one_line(tmp_path, monkeypatch, capsys, family, merge,
                                               expected):
    from peftune.merge.adapter_merge import NOT_MERGEABLE  # noqa: F401 - the module imports

    wide = tmp_path / "wide"
    if "wide" in merge.get("models", []):
        from peftune.models import build_tiny_model

        build_tiny_model(wide, hidden_size=48, heads=4)
    paths = {"m1": str(family["m1"]), "m2": str(family["m2"]), "missing": str(tmp_path / "missing"),
             "wide": str(wide)}
    models = [{"path": paths[m]} for m in merge.pop("models", ["m1", "m2"])]
    base = merge.pop("base", str(family["base"]))
    config = merge_yaml(tmp_path / "m.yaml", **merge, models=models, out=str(tmp_path / "out"),
                        **({"base": base} if base else {}))
    code, _, err = merge_in_process(monkeypatch, capsys, str(config))
    (line,) = err.strip().splitlines()
    assert code == 2 and expected.format(tmp=tmp_path, wide=wide) in line, line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-merge-*"))


def test_a_wrong_written_model_fails_verification(tmp_path, family, monkeypatch):
    from peftune.errors import TrainingError
    from peftune.merge import writer

    real = writer.write_merged

    def halved(*, delta_of, **kwargs):
        def half(name):
            delta = delta_of(name)
            return None if delta is None else 0.5 * delta
        return real(delta_of=half, **kwargs)

    monkeypatch.setattr(writer, "write_merged", halved)
    config = merge_yaml(tmp_path / "m.yaml", method="linear", base=str(family["base"]),
                        models=[{"path": str(family["m1"])}], out=str(tmp_path / "out"))
    with pytest.raises(TrainingError, match="merge verification failed"):
        run_merge(target=str(config), quiet=True)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-merge-*"))
