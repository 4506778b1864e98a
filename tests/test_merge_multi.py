"""Multi-LoRA merging: each method against a hand computation on small tensors, DARE's
seed and expectation, the SVD re-factoring error, and merge.yaml end to end (the merged
model equals the sum of adapter forwards for `linear`), with its refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import fp32_base, logits_of, merge_in_process, run_cli
from test_merge import train_run

from peftune.merge import combine
from peftune.merge.combine import Inputs
from peftune.merge.runner import run_merge

D1 = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
D2 = torch.tensor([[-1.0, -1.0, 2.0, -3.0]])


def inputs(weights=(1.0, 1.0), density=0.5, lam=1.0, q=None, seed=0) -> Inputs:
    return Inputs(deltas=[D1, D2], weights=list(weights), densities=[density, density], lam=lam,
                  q=q, generators=[torch.Generator().manual_seed(seed + i) for i in range(2)])


def test_linear_and_task_arithmetic_are_weighted_sums():
    torch.testing.assert_close(combine.linear(inputs((2.0, 0.5))), 2 * D1 + 0.5 * D2)
    torch.testing.assert_close(combine.task_arithmetic(inputs((2.0, 0.5), lam=0.3)),
                               0.3 * (2 * D1 + 0.5 * D2))


def test_magnitude_prune_keeps_each_deltas_top_density_entries():
    # D1 keeps |3|, |-2|; D2 keeps |-3|, |2|
    expected = torch.tensor([[0.0, -2.0, 3.0, 0.0]]) + torch.tensor([[0.0, 0.0, 2.0, -3.0]])
    torch.testing.assert_close(combine.magnitude_prune(inputs()), expected)


def test_ties_trims_elects_a_weighted_sign_and_takes_the_disjoint_mean():
    # trimmed: t1 = [0, -2, 3, 0], t2 = [0, 0, 2, -3]; sign of the sum: [0, -, +, -]
    torch.testing.assert_close(combine.ties(inputs()), torch.tensor([[0.0, -2.0, 2.5, -3.0]]))
    # weights (2, 1): weighted sum [0, -4, 8, -3]; entry 2 = (2·3 + 1·2) / (2 + 1)
    torch.testing.assert_close(combine.ties(inputs((2.0, 1.0), lam=0.5)),
                               0.5 * torch.tensor([[0.0, -2.0, 8 / 3, -3.0]]))
    # a disagreeing entry is left out of the mean: signs +,- with weights 1, 3 -> sign -
    a, b = torch.tensor([[4.0]]), torch.tensor([[-2.0]])
    out = combine.ties(Inputs(deltas=[a, b], weights=[1.0, 3.0], densities=[1.0, 1.0]))
    torch.testing.assert_close(out, torch.tensor([[-2.0]]))


def test_dare_drops_with_the_seeded_mask_and_rescales_by_one_over_density():
    x = inputs(density=0.5, seed=7)
    masks = [torch.rand(D1.shape, generator=torch.Generator().manual_seed(7 + i)) < 0.5
             for i in range(2)]
    expected = D1 * masks[0] / 0.5 + D2 * masks[1] / 0.5
    torch.testing.assert_close(combine.dare_linear(x), expected)
    # DAREx-q: the same mask, survivors scaled by 1/q
    torch.testing.assert_close(combine.darex_q(inputs(density=0.5, seed=7, q=0.8)),
                               D1 * masks[0] / 0.8 + D2 * masks[1] / 0.8)
    # DARE-TIES: the dropped, rescaled tensors through TIES' election
    dropped = [D1 * masks[0] / 0.5, D2 * masks[1] / 0.5]
    torch.testing.assert_close(combine.dare_ties(inputs(density=0.5, seed=7)),
                               combine.disjoint_merge(dropped, [1.0, 1.0]))


def test_dare_is_unbiased_and_deterministic_for_a_seed():
    delta = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    runs = [combine.dare_drop(delta, 0.3, torch.Generator().manual_seed(s), 1 / 0.3)
            for s in range(4000)]
    mean = torch.stack(runs).mean(0)
    assert float((mean - delta).abs().max()) < 0.15 * float(delta.abs().max())
    again = combine.dare_drop(delta, 0.3, torch.Generator().manual_seed(5), 1 / 0.3)
    assert torch.equal(again, runs[5]) and not torch.equal(runs[5], runs[6])


def test_svd_refactoring_error_is_the_discarded_singular_values_norm():
    delta = torch.randn(12, 9, generator=torch.Generator().manual_seed(1))
    b_mat, a_mat, error = combine.refactor_svd(delta, 4)
    s = torch.linalg.svdvals(delta.double())
    assert b_mat.shape == (12, 4) and a_mat.shape == (4, 9)
    assert error == pytest.approx(float(s[4:].pow(2).sum().sqrt()), rel=1e-9)
    assert float(torch.linalg.norm(delta - b_mat @ a_mat)) == pytest.approx(error, rel=1e-5)
    _, _, none_lost = combine.refactor_svd(delta, 9)
    assert none_lost == pytest.approx(0.0, abs=1e-9)


# ---- merge.yaml end to end ------------------------------------------------------------------

@pytest.fixture(scope="module")
def loras(tmp_path_factory, tiny_model_dir, text_data) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("multi-runs")
    return {m: train_run(tmp, tiny_model_dir, text_data["train"], m) for m in ("lora", "sora", "dora")}


def merge_yaml(path: Path, **merge) -> Path:
    path.write_text(yaml.safe_dump({"merge": merge}, sort_keys=False))
    return path


def test_linear_with_unit_weights_equals_the_sum_of_adapter_forwards(tmp_path, loras,
                                                                     tiny_model_dir):
    from peft import PeftModel

    config = merge_yaml(tmp_path / "m.yaml", method="linear", out=str(tmp_path / "out"),
                        adapters=[{"path": str(loras["lora"])}, {"path": str(loras["sora"])}])
    report = run_merge(target=str(config), quiet=True)
    assert report["verification"]["ok"] and report["modules_changed"] == 14
    both = PeftModel.from_pretrained(fp32_base(tiny_model_dir), str(loras["lora"] / "adapter"),
                                     adapter_name="a")
    both.load_adapter(str(loras["sora"] / "adapter"), adapter_name="b")
    both.base_model.set_adapter(["a", "b"])  # both active: their forwards add up
    torch.testing.assert_close(logits_of(fp32_base(tmp_path / "out")), logits_of(both), rtol=0,
                               atol=1e-5)
    assert json.loads((tmp_path / "out" / "merge_report.json").read_text())["method"] == "linear"


def test_dare_ties_merge_is_deterministic_for_a_seed(tmp_path, loras):
    from safetensors.torch import load_file

    written = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        config = merge_yaml(tmp_path / f"{name}.yaml", method="dare_ties", density=0.5, seed=seed,
                            out=str(tmp_path / name),
                            adapters=[{"path": str(loras["lora"])}, {"path": str(loras["sora"])}])
        run_merge(target=str(config), quiet=True)
        written.append(load_file(tmp_path / name / "model.safetensors"))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert all(torch.equal(written[0][k], written[1][k]) for k in written[0])
    assert not torch.equal(written[0][key], written[2][key])


def test_out_rank_writes_a_lora_and_reports_the_truncation_error(tmp_path, loras, tiny_model_dir):
    from peft import PeftModel

    from peftune.merge.deltas import load_lora_adapter

    config = merge_yaml(tmp_path / "m.yaml", method="task_arithmetic", out=str(tmp_path / "out"),
                        adapters=[{"path": str(loras["lora"]), "weight": 0.7},
                                  {"path": str(loras["sora"]), "weight": 0.3}])
    report = run_merge(target=str(config), out_rank=2, quiet=True)
    a, b = (load_lora_adapter(loras[m] / "adapter") for m in ("lora", "sora"))
    discarded = 0.0
    for module in a.factors:
        s = torch.linalg.svdvals((0.7 * a.delta(module) + 0.3 * b.delta(module)).double())
        discarded += float(s[2:].pow(2).sum())
    assert report["truncation_error"] == pytest.approx(math.sqrt(discarded), rel=1e-5)
    out = tmp_path / "out"
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 2 and adapter["peft_type"] == "LORA"
    loaded = PeftModel.from_pretrained(fp32_base(tiny_model_dir), str(out))
    assert (logits_of(loaded) - logits_of(fp32_base(tiny_model_dir))).abs().max() > 1e-3


@pytest.mark.parametrize(("merge", "expected"), [
    ({"method": "tis"}, "{cfg}:2: merge.method: unknown merge method; choose one of: dare_linear"),
    ({"method": "ties", "densty": 0.5}, "{cfg}:3: merge.densty: unknown key (did you mean density?)"),
    ({"method": "ties", "density": 0}, "merge.density: must be > 0, got 0"),
    ({"method": "dare_linear", "density": 1.5}, "merge.density: must be <= 1, got 1.5"),
    ({"method": "linear", "density": 0.5}, "merge.density: linear keeps every entry"),
    ({"method": "darex_q", "density": 0.5}, "merge.q: required by darex_q"),
    ({"method": "linear", "extra": "dora"}, "merge.adapters[1].path: a DoRA adapter"),
    ({"method": "linear", "extra": "wide"}, "merge.adapters[1] was trained on"),
    ({"method": "linear", "extra": "missing"}, "merge.adapters[1].path: RUN_DIR"),
])
def test_bad_merge_yaml_exits_2_with_one_line(tmp_path, monkeypatch, capsys, loras, merge,
                                              expected):
    extra = merge.pop("extra", None)
    second = {"dora": str(loras["dora"]), "missing": str(tmp_path / "nope"),
              "wide": str(_wide_adapter(tmp_path)) if extra == "wide" else None}.get(extra)
    config = merge_yaml(tmp_path / "m.yaml", **merge, out=str(tmp_path / "out"),
                        adapters=[{"path": str(loras["lora"])},
                                  {"path": second or str(loras["sora"])}])
    code, _, err = merge_in_process(monkeypatch, capsys, str(config))
    (line,) = err.strip().splitlines()
    assert code == 2 and line.startswith("error: ") and expected.format(cfg=config) in line, line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-merge-*"))


def _wide_adapter(tmp_path: Path) -> Path:
    """A LoRA adapter on another base (hidden 48)."""
    from peft import LoraConfig, get_peft_model

    from peftune.models import build_tiny_model

    base = build_tiny_model(tmp_path / "wide", hidden_size=48, heads=4)
    out = tmp_path / "wide-adapter"
    get_peft_model(fp32_base(base), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(out)
    return out


def test_merge_command_is_in_the_help():
    done = run_cli("merge", "--help", timeout=60, env={"COLUMNS": "200", "PATH": ""},
                   inherit_env=False)
    assert done.returncode == 0 and "--out-rank" in done.stdout and "--shard-size" in done.stdout


# ---- PCB and LoRA-LEGO ----------------------------------------------------------------------

def test_pcb_balances_intra_and_inter_task_importance_by_hand():
    t1, t2 = torch.tensor([[1.0, 2.0]]), torch.tensor([[2.0, -1.0]])
    e, big = math.e, math.e**2
    # intra: Softmax(2·Norm(τ²)): τ1² = [1, 4] -> [0, 1]; τ2² = [4, 1] -> [1, 0]
    intra1, intra2 = [1 / (1 + big), big / (1 + big)], [big / (1 + big), 1 / (1 + big)]
    # inter: Σ_j Softmax(Norm(τ_i·τ_j)); τ1·τ1 -> [0, 1], τ1·τ2 = [2, -2] -> [1, 0]: sums to [1, 1]
    inter1, inter2 = [1.0, 1.0], [2 * e / (1 + e), 2 / (1 + e)]
    b1 = [i * j for i, j in zip(intra1, inter1, strict=True)]
    b2 = [i * j for i, j in zip(intra2, inter2, strict=True)]
    expected = [(b1[0] * 1 + b2[0] * 2) / (b1[0] + b2[0]), (b1[1] * 2 - b2[1]) / (b1[1] + b2[1])]
    x = Inputs(deltas=[t1, t2], weights=[1.0, 1.0], densities=[1.0, 1.0], lam=0.5)
    torch.testing.assert_close(combine.pcb(x), 0.5 * torch.tensor([expected]))
    # density 0.5 keeps each task's top score: τ1's entry 1 and τ2's entry 0
    x = Inputs(deltas=[t1, t2], weights=[1.0, 1.0], densities=[0.5, 0.5])
    torch.testing.assert_close(combine.pcb(x), torch.tensor([[2.0, 2.0]]))


def lego(factors, k, seed=0, weights=None, lam=1.0):
    deltas = [b @ a for b, a in factors]
    return combine.lora_lego(Inputs(deltas=deltas, weights=weights or [1.0] * len(factors),
                                    densities=[1.0] * len(factors), lam=lam, factors=factors,
                                    k=k, generator=torch.Generator().manual_seed(seed)))


def test_lora_lego_with_one_cluster_by_hand():
    # units [b; a]: [1, 0, 2, 0] and [0, 1, 0, -1] -> made canonical [0, -1, 0, 1]
    first = (torch.tensor([[1.0], [0.0]]), torch.tensor([[2.0, 0.0]]))
    second = (torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0, -1.0]]))
    outer = torch.tensor([[0.5], [-0.5]]) @ torch.tensor([[1.0, 0.5]])  # centroid b·aᵀ
    expected = math.sqrt(5) * outer / outer.norm()  # ‖ΔW1 + ΔW2‖ = ‖diag(2, -1)‖ = √5
    torch.testing.assert_close(lego([first, second], k=1, lam=0.5), 0.5 * expected)


def test_lora_lego_rescales_each_centroid_to_its_members_mean_norm():
    # two clear groups: units near [1, 0; 1, 0] (norms differ) and near [0, 1; 0, 1]
    first = (torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.1], [0.0, 1.0]]))
    second = (torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([[2.0, 0.0], [0.6, 1.0]]))
    u = [torch.tensor([1.0, 0.0, 1.0, 0.1]), torch.tensor([2.0, 0.0, 2.0, 0.0]),
         torch.tensor([0.0, 1.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 0.6, 1.0])]
    merged = torch.zeros(2, 2)
    for group in ((u[0], u[1]), (u[2], u[3])):
        center = (group[0] + group[1]) / 2
        center = center * (group[0].norm() + group[1].norm()) / 2 / center.norm()
        merged += torch.outer(center[:2], center[2:])
    linear_norm = (first[0] @ first[1] + second[0] @ second[1]).norm()
    torch.testing.assert_close(lego([first, second], k=2), merged * linear_norm / merged.norm())


def test_lora_lego_with_k_equal_to_all_ranks_is_the_linear_merge_and_is_seeded():
    g = torch.Generator().manual_seed(3)
    factors = [(torch.randn(6, r, generator=g), torch.randn(r, 5, generator=g)) for r in (2, 3)]
    linear = factors[0][0] @ factors[0][1] + 0.5 * (factors[1][0] @ factors[1][1])
    torch.testing.assert_close(lego(factors, k=5, weights=[1.0, 0.5]), linear)
    wide = [(torch.randn(6, 8, generator=g), torch.randn(8, 5, generator=g)) for _ in range(2)]
    assert torch.equal(lego(wide, k=3, seed=4), lego(wide, k=3, seed=4))
    with pytest.raises(ValueError, match="more than the 16 rank units"):
        lego(wide, k=17)


def test_pcb_and_lora_lego_merge_yaml_end_to_end(tmp_path, loras):
    from safetensors.torch import load_file

    pair = [{"path": str(loras["lora"])}, {"path": str(loras["sora"])}]
    report = run_merge(target=str(merge_yaml(tmp_path / "p.yaml", method="pcb", density=0.5,
                                             out=str(tmp_path / "pcb"), adapters=pair)), quiet=True)
    assert report["verification"]["ok"] and report["modules_changed"] == 14
    for name, k in (("lego", 8), ("lego2", 8), ("lin", None)):
        merge = {"method": "linear"} if k is None else {"method": "lora_lego", "k": k, "seed": 1}
        run_merge(target=str(merge_yaml(tmp_path / f"{name}.yaml", **merge, adapters=pair,
                                        out=str(tmp_path / name))), quiet=True)
    lego8, again, lin = (load_file(tmp_path / n / "model.safetensors") for n in ("lego", "lego2", "lin"))
    assert all(torch.equal(lego8[n], again[n]) for n in lego8)  # seeded
    for n in lin:  # k = every rank unit (4 + 4): each unit its own cluster, the linear merge
        torch.testing.assert_close(lego8[n], lin[n], rtol=1e-4, atol=1e-6)
    report = run_merge(target=str(merge_yaml(tmp_path / "l3.yaml", method="lora_lego", k=3,
                                             adapters=pair, out=str(tmp_path / "l3"))),
                       out_rank=3, quiet=True)
    assert report["truncation_error"] < 1e-4 * math.sqrt(14)  # a rank-3 ΔW is exact at rank 3


@pytest.mark.parametrize(("merge", "expected"), [
    ({"method": "lora_lego"}, "merge.k: required by lora_lego"),
    ({"method": "lora_lego", "k": 0}, "merge.k: must be >= 1, got 0"),
    ({"method": "lora_lego", "k": 9}, "merge.k: 9 is more than the 8 rank units the adapters "
                                      "hold for model.layers.0"),
    ({"method": "ties", "k": 2}, "merge.k: ties does not use k"),
    ({"method": "lora_lego", "k": 2, "density": 0.5}, "merge.density: lora_lego keeps every"),
    ({"method": "pcb", "density": 1.5}, "merge.density: must be <= 1, got 1.5"),
])
def test_bad_pcb_and_lora_lego_input_exits_2(tmp_path, monkeypatch, capsys, loras, merge, expected):
    config = merge_yaml(tmp_path / "m.yaml", **merge, out=str(tmp_path / "out"),
                        adapters=[{"path": str(loras["lora"])}, {"path": str(loras["sora"])}])
    code, _, err = merge_in_process(monkeypatch, capsys, str(config))
    (line,) = err.strip().splitlines()
    assert code == 2 and expected in line, line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-merge-*"))
