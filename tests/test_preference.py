"""Preference objectives (train/objectives.py) and data (data/preference.py) on the tiny model.

The losses are checked against formulas written here from each paper, over log-probs that
this file computes on its own: each sequence alone, unpacked, from the full logits. Then
the run-level promises: gradient accumulation and a second process change nothing, resume is
bitwise, the reference is the starting model however it is had, and bad input is one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    LAUNCH_ENV,
    NO_DEBUG,
    WORDS,
    assert_one_line,
    main_in_process,
    pref_recipe,
    read_metrics,
    run_cli,
    train_in_process,
    write_jsonl,
    write_recipe,
)
from safetensors.torch import load_file

from peftune.errors import InputError
from peftune.recipe import load_recipe

# ---- the formulas ----------------------------------------------------------------------

def alone_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's summed response log-prob and length, every example run by itself
    without padding or packing, from the full logits (independent of train/loss.py)."""
    logps, lengths = [], []
    for row in range(batch["input_ids"].shape[0]):
        segments = batch["segment_ids"][row]
        for segment in segments.unique().tolist():
            if segment < 0:
                continue
            where = segments == segment
            ids, labels = batch["input_ids"][row][where], batch["labels"][row][where]
            logits = model(input_ids=ids[None], use_cache=False).logits[0, :-1].float()
            targets = labels[1:]
            scored = targets != -100
            token = torch.log_softmax(logits, -1)[scored].gather(1, targets[scored][:, None])
            logps.append((segment, token.sum()))
            lengths.append((segment, int(scored.sum())))
    logps = torch.stack([v for _, v in sorted(logps, key=lambda x: x[0])])
    return logps, torch.tensor([v for _, v in sorted(lengths)], dtype=torch.float32)


def paper_loss(name: str, cfg, pol, ref, lengths) -> torch.Tensor:
    """The mean over pairs of each paper's loss, with (P, 2) chosen/rejected tensors."""
    logsig = F.logsigmoid
    if name in ("dpo", "ln-dpo"):
        ratio = pol - ref
        if name == "ln-dpo":
            ratio = ratio / lengths
        h = ratio[:, 0] - ratio[:, 1]
        eps = cfg.label_smoothing
        return (-(1 - eps) * logsig(cfg.beta * h) - eps * logsig(-cfg.beta * h)).mean()
    if name == "ipo":
        h = ((pol - ref) / lengths)[:, 0] - ((pol - ref) / lengths)[:, 1]
        return ((h - 1 / (2 * cfg.beta)) ** 2).mean()
    if name == "simpo":
        avg = pol / lengths
        return -logsig(cfg.beta * avg[:, 0] - cfg.beta * avg[:, 1] - cfg.gamma).mean()
    if name == "orpo":
        avg = pol / lengths
        p = avg.exp()
        odds = torch.log(p / (1 - p))
        sft = -pol[:, 0].sum() / lengths[:, 0].sum()
        return sft + cfg.lambda_ * -logsig(odds[:, 0] - odds[:, 1]).mean()
    raise AssertionError(name)


def _first_batch(built):
    return built.batches_for_epoch(0)[0]


@pytest.mark.parametrize(("objective", "keys"), [
    ("dpo", {}), ("dpo", {"label_smoothing": 0.2, "beta": 0.5}), ("ln-dpo", {}), ("ipo", {}),
    ("orpo", {"lambda": 0.3}), ("simpo", {"gamma": 0.7})])
def test_each_pair_loss_and_its_gradients_equal_the_papers_formula(
        tmp_path, tiny_model_dir, pair_data, objective, keys):
    from peftune.train.setup import build_training

    recipe = load_recipe(pref_recipe(tmp_path, tiny_model_dir, pair_data["train"],
                                     {"name": objective, **keys},
                                     adapter={"method": "lora", "r": 4, "target_modules": "all-linear"}))
    built = build_training(recipe, quiet=True)
    model = built.unwrapped_model
    with torch.no_grad():  # move the adapter off its zero init, so that policy != reference
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    batch = _first_batch(built)
    cfg = recipe.train.objective
    totals = {"pairs": len(batch["roles"]) / 2,
              "chosen_tokens": float(alone_logps(model, batch)[1][0::2].sum())}
    ref = built.reference.train(batch) if built.reference else None

    loss, sums = built.objective.loss(model, batch, totals, built.reference.train if ref is not None else None)
    ours = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])

    pol, lengths = alone_logps(model, batch)
    if ref is not None:
        with model.disable_adapter(), torch.no_grad():
            ref_alone = alone_logps(model, batch)[0]
        torch.testing.assert_close(ref, ref_alone, rtol=1e-5, atol=1e-4)
        ref_alone = ref_alone.view(-1, 2)
    else:
        ref_alone = None
    expected = paper_loss(objective, cfg, pol.view(-1, 2), ref_alone, lengths.view(-1, 2))
    theirs = torch.autograd.grad(expected, [p for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert sums["pairs"] == len(batch["roles"]) / 2
    assert 0 <= sums["reward_accuracy"] <= sums["pairs"]


def test_kto_loss_equals_the_papers_formula_with_the_step_kl(tmp_path, tiny_model_dir, pair_data):
    from peftune.train.setup import build_training

    recipe = load_recipe(pref_recipe(tmp_path, tiny_model_dir, pair_data["kto"],
                                     {"name": "kto", "desirable_weight": 1.5}, fmt="kto"))
    built = build_training(recipe, quiet=True)
    model = built.unwrapped_model
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    batch = _first_batch(built)
    reference = built.reference.train
    totals = {"completions": float(len(batch["roles"])),
              **built.objective.step_sums(model, batch, reference)}
    loss, _ = built.objective.loss(model, batch, totals, reference)

    pol, _ = alone_logps(model, batch)
    with model.disable_adapter(), torch.no_grad():
        ref = alone_logps(model, batch)[0]
    r = pol - ref
    z = r.detach().mean().clamp(min=0)
    good = batch["roles"] == 3
    beta = recipe.train.objective.beta
    expected = torch.where(good, 1.5 * (1 - torch.sigmoid(beta * (r - z))),
                           1.0 * (1 - torch.sigmoid(beta * (z - r)))).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_sequence_logps_through_a_lora_adapted_head_equal_the_full_logits(tiny_model_dir, pair_data,
                                                                       tmp_path):
    """A head with trainable weights takes the checkpointed route; its gradients too."""
    from peftune.train.loss import sequence_logps
    from peftune.train.setup import build_training

    recipe = load_recipe(pref_recipe(tmp_path, tiny_model_dir, pair_data["train"], adapter={
        "method": "lora", "r": 4, "target_modules": ["q_proj", "lm_head"]}))
    built = build_training(recipe, quiet=True)
    model, batch = built.unwrapped_model, _first_batch(built)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    params = [p for p in model.parameters() if p.requires_grad]
    weights = torch.linspace(0.5, 1.5, len(batch["roles"]))
    for chunked in (True, False):
        logps, lengths = sequence_logps(model, batch, chunked=chunked)
        grads = torch.autograd.grad((logps * weights).sum(), params)
        alone, alone_lengths = alone_logps(model, batch)
        torch.testing.assert_close(logps, alone, rtol=1e-5, atol=1e-4)
        assert lengths.tolist() == alone_lengths.long().tolist()
        expected = torch.autograd.grad((alone * weights).sum(), params)
        for a, b in zip(grads, expected, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ---- runs -------------------------------------------------------------------------------

def _adapter(run: Path) -> dict:
    return load_file(run / "adapter" / "adapter_model.safetensors")


# kto (its KL estimate spans the step) in the default run; dpo and orpo share its counting
@pytest.mark.parametrize("objective", [pytest.param("dpo", marks=pytest.mark.slow),
                                       pytest.param("orpo", marks=pytest.mark.slow), "kto"])
def test_gradient_accumulation_equals_one_bigger_batch(tmp_path, tiny_model_dir, pair_data,
                                                       objective):
    data, fmt = (pair_data["kto"], "kto") if objective == "kto" else (pair_data["train"], "preference")
    one = pref_recipe(tmp_path, tiny_model_dir, data, objective, name="one", fmt=fmt,
                      train={"batch_size": 4, "grad_accum": 1})
    acc = pref_recipe(tmp_path, tiny_model_dir, data, objective, name="acc", fmt=fmt,
                      data_keys={"packing": False}, train={"batch_size": 1, "grad_accum": 4})
    train_in_process(one, ["data.packing=false"])
    train_in_process(acc)
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "acc")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    assert read_metrics(tmp_path / "one")[-1]["loss"] == pytest.approx(
        read_metrics(tmp_path / "acc")[-1]["loss"], rel=1e-5)


def test_two_processes_train_as_one(tmp_path, tiny_model_dir, pair_data):
    """2-process DDP with KTO: the step's KL estimate and the counts span both processes."""
    one = pref_recipe(tmp_path, tiny_model_dir, pair_data["kto"], "kto", name="one", fmt="kto",
                      data_keys={"packing": False}, train={"batch_size": 2, "grad_accum": 2})
    two = pref_recipe(tmp_path, tiny_model_dir, pair_data["kto"], "kto", name="two", fmt="kto",
                      data_keys={"packing": False}, train={"batch_size": 2, "grad_accum": 1})
    train_in_process(one)
    done = run_cli("train", two, "--nproc", "2", env=LAUNCH_ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = _adapter(tmp_path / "one"), _adapter(tmp_path / "two")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    metrics = [r for r in read_metrics(tmp_path / "two") if "loss" in r]
    assert [r["step"] for r in metrics] == [1, 2, 3, 4] and "kl" in metrics[0]


def test_resume_is_bitwise_and_the_metrics_continue(tmp_path, tiny_model_dir, pair_data):
    from conftest import assert_resume_matches_uninterrupted

    assert_resume_matches_uninterrupted(
        tmp_path, model=tiny_model_dir, data=pair_data["train"], adapter={"method": "lora", "r": 4},
        data_keys={"format": "preference"}, train_keys={"objective": "dpo"})


def test_precomputed_reference_equals_the_adapter_switched_off(tmp_path, tiny_model_dir, pair_data):
    """For LoRA (zero-initialised B) both ways give the starting model: the same run."""
    off = pref_recipe(tmp_path, tiny_model_dir, pair_data["train"],
                      {"name": "dpo", "reference": "adapter_off"}, name="off", val=pair_data["val"])
    pre = pref_recipe(tmp_path, tiny_model_dir, pair_data["train"],
                      {"name": "dpo", "reference": "precomputed"}, name="pre", val=pair_data["val"])
    built, summary = train_in_process(off)
    assert summary["objective"]["reference"] == "adapter_off"
    assert train_in_process(pre)[1]["objective"]["reference"] == "precomputed"
    a, b = _adapter(tmp_path / "off"), _adapter(tmp_path / "pre")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6)
    records = [r for r in read_metrics(tmp_path / "off") if "val_loss" in r]
    assert records[0]["val_loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference
    assert records[0]["val_reward_margin"] == pytest.approx(0.0, abs=1e-5)


def test_auto_reference_precomputes_where_the_adapter_rewrites_the_base(tmp_path, tiny_model_dir,
                                                                     pair_data):
    """PiSSA moves W's top singular part into the adapter: switching it off is not the
    starting model, so auto precomputes; a full fine-tune has no adapter at all."""
    pissa = pref_recipe(tmp_path, tiny_model_dir, pair_data["train"], name="pissa",
                        adapter={"method": "pissa", "r": 4}, val=pair_data["val"])
    built, summary = train_in_process(pissa)
    assert summary["objective"]["reference"] == "precomputed"
    first = [r for r in read_metrics(tmp_path / "pissa") if "val_loss" in r][0]
    assert first["val_reward_margin"] == pytest.approx(0.0, abs=1e-4)  # step 0: policy == ref
    full = pref_recipe(tmp_path, tiny_model_dir, pair_data["train"], name="full",
                       adapter={"method": "full"}, train={"lr": 1e-3})
    assert train_in_process(full)[1]["objective"]["reference"] == "precomputed"
    assert (tmp_path / "full" / "model").is_dir()
    card = (tmp_path / "full" / "README.md").read_text()  # a whole model loads without peft
    assert f'AutoModelForCausalLM.from_pretrained("{tmp_path / "full" / "model"}")' in card
    assert "with the `dpo` objective" in card and "PeftModel" not in card


@pytest.mark.slow  # the precomputed table of the default-run tests, from another model
def test_a_reference_model_path_is_precomputed_from_that_model(tmp_path, tiny_model_dir, pair_data):
    from peftune.models import build_tiny_model

    other = build_tiny_model(tmp_path / "other", hidden_size=32, layers=2, heads=4, seed=7)
    run = pref_recipe(tmp_path, tiny_model_dir, pair_data["train"],
                      {"name": "dpo", "reference": str(other)}, val=pair_data["val"])
    _, summary = train_in_process(run)
    assert summary["objective"]["reference"] == str(other)
    first = [r for r in read_metrics(tmp_path / "run") if "val_loss" in r][0]
    assert abs(first["val_reward_margin"]) > 1e-3  # another model: policy != reference


def test_chat_messages_and_string_responses_score_only_the_response(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from peftune.data import build_datasets
    from peftune.recipe.schema import DataSection

    rows = [{"prompt": [{"role": "user", "content": "alpha beta"}], "chosen": "gamma",
             "rejected": [{"role": "assistant", "content": "omega psi"}]}]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    built = build_datasets(DataSection(train=str(data), format="preference"), tokenizer, seed=0).train
    assert built.roles.tolist() == [1, 2]
    for index, response in ((0, "gamma"), (1, "omega psi")):
        ids, labels = built[index]
        target = tokenizer.decode([t for t in labels if t != -100])
        assert target.startswith(response) and "<|im_end|>" in target
        assert "alpha beta" in tokenizer.decode(ids) and "alpha" not in target


def test_objective_metrics_reach_metrics_jsonl_the_summary_and_the_plot(tmp_path, tiny_model_dir,
                                                                       pair_data):
    run = pref_recipe(tmp_path, tiny_model_dir, pair_data["train"], "simpo", val=pair_data["val"],
                      train={"max_steps": 4, "eval_every": 2})
    done = run_cli("train", run, env=NO_DEBUG, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "objective simpo" in done.stdout and "reward acc" in done.stdout
    logged = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    for key in ("reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp",
                "chosen_length", "rejected_length"):
        assert key in logged[0]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["objective"]["name"] == "simpo" and "val_reward_accuracy" in summary["objective"]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 10_000


def test_dpo_over_an_nf4_base(tmp_path, tiny_model_dir, pair_data):
    run = pref_recipe(tmp_path, tiny_model_dir, pair_data["train"], "dpo",
                      quant={"method": "nf4", "compute_dtype": "float32"})
    _, summary = train_in_process(run)
    assert summary["objective"]["reference"] == "adapter_off" and summary["steps"] == 4


# ---- bad input: one line, exit 2, nothing written -----------------------------------------

@pytest.mark.parametrize(("rows", "data_keys", "train_keys", "expected"), [
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a b", "chosen": "c"}], {}, {},
     "bad.jsonl:2: missing field; the row has: chosen, prompt (field 'rejected')"),
    ([{"prompt": "a b", "chosen": "c d", "rejected": "c d"}], {}, {},
     "bad.jsonl:1: chosen and rejected are the same response"),
    ([{"prompt": " ".join(WORDS * 3), "chosen": "c", "rejected": "d e"}], {"max_length": 16}, {},
     "bad.jsonl:1: the prompt leaves no room for the response within data.max_length=16; set "
     "data.truncation: left"),
    ([{"prompt": "a", "completion": "b", "label": True}], {"format": "kto"}, {},
     "train.objective: objective dpo trains on chosen/rejected pairs and needs data.format: "
     "preference, got kto"),
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}], {}, {"objective": "kto"},
     "train.objective: objective kto trains on unpaired rows"),
    ([{"prompt": "a", "completion": "b", "label": "yes"}], {"format": "kto"}, {"objective": "kto"},
     "bad.jsonl:1: expected true or false"),
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}], {},
     {"objective": {"name": "dpo", "gamma": 1.0}}, "objective dpo has no key 'gamma'"),
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}], {},
     {"objective": {"name": "dpo", "reference": "/nonexistent/model"}},
     "train.objective.reference: "),
    ([{"prompt": "a", "chosen": "b", "rejected": "c"}], {}, {"objective": "sft"},
     "data.format: preference is for preference objectives"),
])
def test_bad_preference_input_is_one_line_exit_2_and_writes_nothing(
        tmp_path, monkeypatch, capsys, tiny_model_dir, rows, data_keys, train_keys, expected):
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    train = {"objective": "dpo", **train_keys}
    recipe = write_recipe(tmp_path / "r.yaml", model=tiny_model_dir, data=data,
                          out=tmp_path / "run", data_keys={"format": "preference", **data_keys},
                          train=train)
    monkeypatch.delenv("PEFTUNE_DEBUG", raising=False)
    code, _, err = main_in_process(capsys, "train", recipe)  # in process: 9 cases, ~1 s each
    assert_one_line(code, err, expected)
    assert not (tmp_path / "run").exists()


def test_identical_pairs_are_counted_and_skipped_with_on_bad_row_skip(tmp_path, tiny_model_dir,
                                                                      pair_data):
    rows = [json.loads(line) for line in pair_data["train"].read_text().splitlines()]
    rows[3]["rejected"] = rows[3]["chosen"]
    data = write_jsonl(tmp_path / "some_bad.jsonl", rows)
    run = pref_recipe(tmp_path, tiny_model_dir, data, data_keys={"on_bad_row": "skip"})
    _, summary = train_in_process(run)
    assert summary["data"]["rows_skipped"] == 1
    assert summary["data"]["train_examples"] == 2 * (len(rows) - 1)


def test_other_objectives_keys_are_refused_at_load(tmp_path, tiny_model_dir, pair_data):
    with pytest.raises(InputError, match="objective orpo has no key 'beta'.*only dpo"):
        load_recipe(pref_recipe(tmp_path, tiny_model_dir, pair_data["train"],
                                {"name": "orpo", "beta": 0.1}))
