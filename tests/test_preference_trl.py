"""Each preference loss against TRL's (TRL 1.16, installed by the `bench` extra; skipped
without it). test_preference.py checks the same losses against formulas written from the
papers: this is a second, independent implementation, never the only check.

TRL 1.16 has no standalone loss functions: a trainer computes its log-probs inside its loss
step. So each test builds TRL's trainer around a copy of the policy (the LoRA merged: a
plain transformers model), with the base model as its `ref_model` where the loss has one,
and calls its `compute_loss` on a batch from TRL's own collator. Only the token ids are
peftune's (TRL tokenizes prompt and response separately, by rules of its own), so both
sides score the same tokens. peftune's side is the objective's `loss` on the run's first
batch, the reference being the adapter switched off, as in a run.

dpo = DPOTrainer `sigmoid`, ln-dpo = `sigmoid_norm`, ipo = `ipo`; simpo = CPOTrainer
`simpo` with cpo_alpha 0 (no NLL term: the SimPO paper's loss); orpo = ORPOTrainer (its beta
is ORPO's λ) without the SFT term, which differs by design (see its test); kto = KTOTrainer
with each row's KL completion its own completion, so that TRL's KL estimate is the batch's
mean log-ratio, the z peftune documents (TRL's default pairs each prompt with another row's
completion). Not compared: dpo's label smoothing (TRL 1.16's `sigmoid` loss has none; its
`robust` and `exo_pair` are other formulas).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import kto_rows, make_pairs, pref_recipe, write_jsonl

from peftune.data.formats import ROLE_DESIRABLE

pytest.importorskip("trl")

PAIRS = make_pairs(2, seed=3)


def _perturbed_run(root: Path, model_dir: Path, objective: str, fmt: str, rows: list[dict]):
    """A built LoRA run whose adapter moved off its zero init (policy != reference), and
    its first micro-batch, which holds every example."""
    from peftune.recipe import load_recipe
    from peftune.train.setup import build_training

    data = write_jsonl(root / f"{fmt}.jsonl", rows)
    recipe = load_recipe(pref_recipe(root, model_dir, data, objective, fmt=fmt, adapter={
        "method": "lora", "r": 4, "target_modules": "all-linear"}))
    built = build_training(recipe, quiet=True)
    with torch.no_grad():
        for name, param in built.unwrapped_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    (batch,) = built.batches_for_epoch(0)
    assert len(batch["roles"]) == (2 if fmt == "preference" else 1) * len(rows)
    return built, batch


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory, tiny_model_dir):
    return _perturbed_run(tmp_path_factory.mktemp("trl-pairs"), tiny_model_dir, "dpo",
                          "preference", PAIRS)


@pytest.fixture(scope="module")
def kto_run(tmp_path_factory, tiny_model_dir):
    return _perturbed_run(tmp_path_factory.mktemp("trl-kto"), tiny_model_dir, "kto", "kto",
                          kto_rows(PAIRS))


def _examples(batch: dict) -> list[tuple[list[int], list[int]]]:
    """Each example's (prompt ids, response ids) in the order of batch["roles"]: the
    response is the labelled suffix."""
    out = []
    for segment in range(len(batch["roles"])):
        where = batch["segment_ids"] == segment
        ids, labels = batch["input_ids"][where].tolist(), batch["labels"][where].tolist()
        start = next(i for i, label in enumerate(labels) if label != -100)
        assert labels[start:] == ids[start:]  # a prompt, then the scored response
        out.append((ids[:start], ids[start:]))
    return out


def _peftune_loss(built, batch: dict, objective: dict) -> tuple[torch.Tensor, dict]:
    """The objective's loss on the batch as the loop computes it (the step is this batch)."""
    from peftune.recipe.schema import ObjectiveSection
    from peftune.train.objectives import build_objective

    built_objective = build_objective(ObjectiveSection.model_validate(objective))
    reference = built.reference.train
    totals = built_objective.counts(batch)
    if built_objective.step_pass:
        totals.update(built_objective.step_sums(built.unwrapped_model, batch, reference))
    with torch.no_grad():
        return built_objective.loss(built.unwrapped_model, batch, totals, reference)


def _trl_trainer(trainer_cls, config_cls, built, tmp_path: Path, rows: list[dict], *,
                 reference: bool, **config):
    """TRL's trainer around a merged copy of the policy (and the base as its reference)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    policy = copy.deepcopy(built.unwrapped_model).merge_and_unload()
    args = config_cls(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True,
                      bf16=False, per_device_train_batch_size=len(rows), max_length=256,
                      **config)
    extra = {}
    if reference:
        extra["ref_model"] = AutoModelForCausalLM.from_pretrained(built.recipe.model.path)
    return trainer_cls(model=policy, args=args, train_dataset=Dataset.from_list(rows),
                       processing_class=built.tokenizer, **extra)


def _pairs(batch: dict) -> list[tuple[list[int], list[int], list[int]]]:
    examples = _examples(batch)
    pairs = []
    for (prompt, chosen), (other_prompt, rejected) in zip(examples[0::2], examples[1::2],
                                                         strict=True):
        assert prompt == other_prompt
        pairs.append((prompt, chosen, rejected))
    return pairs


def _beta(objective: str) -> float:
    from peftune.recipe.schema import ObjectiveSection

    return ObjectiveSection.model_validate({"name": objective}).beta


@pytest.mark.parametrize(("objective", "loss_type"), [
    ("dpo", "sigmoid"), ("ln-dpo", "sigmoid_norm"), ("ipo", "ipo")])
def test_reference_objectives_equal_trls_dpo_trainer(tmp_path, pair_run, objective, loss_type):
    from trl import DPOConfig, DPOTrainer

    built, batch = pair_run
    ours, sums = _peftune_loss(built, batch, {"name": objective})
    trainer = _trl_trainer(DPOTrainer, DPOConfig, built, tmp_path, PAIRS, reference=True,
                           beta=_beta(objective), loss_type=[loss_type])
    rows = [{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in _pairs(batch)]
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, trainer.data_collator(rows))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    logged = trainer._metrics["train"]
    pairs = sums["pairs"]
    assert sums["chosen_logp"] / pairs == pytest.approx(logged["logps/chosen"][0], rel=1e-5)
    assert sums["rejected_logp"] / pairs == pytest.approx(logged["logps/rejected"][0], rel=1e-5)
    if objective == "dpo":  # the same reward β·(log π - log π_ref); ln-dpo and ipo divide it
        assert sums["reward_margin"] / pairs == pytest.approx(logged["rewards/margins"][0],
                                                              rel=1e-4, abs=1e-6)
        assert ours.item() != pytest.approx(0.6931, abs=1e-3)  # policy != reference


def _legacy_features(batch: dict) -> list[dict]:
    """The rows CPOTrainer and ORPOTrainer tokenize to: prompt + response ids, -100 labels
    on the prompt."""
    features = []
    for prompt, chosen, rejected in _pairs(batch):
        row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for side, response in (("chosen", chosen), ("rejected", rejected)):
            ids = prompt + response
            row |= {f"{side}_input_ids": ids, f"{side}_attention_mask": [1] * len(ids),
                    f"{side}_labels": [-100] * len(prompt) + response}
        features.append(row)
    return features


def test_simpo_equals_trls_cpo_trainer_with_the_simpo_loss(tmp_path, pair_run):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    built, batch = pair_run
    ours, sums = _peftune_loss(built, batch, {"name": "simpo", "beta": 2.0, "gamma": 0.7})
    trainer = _trl_trainer(CPOTrainer, CPOConfig, built, tmp_path, PAIRS, reference=False,
                           loss_type="simpo", beta=2.0, simpo_gamma=0.7, cpo_alpha=0.0)
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, trainer.data_collator(_legacy_features(batch)))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    _assert_same_rewards(sums, trainer._stored_metrics["train"])  # β x mean token log-prob


def _assert_same_rewards(sums: dict, logged: dict) -> None:
    for side in ("chosen", "rejected"):
        assert sums[f"{side}_reward"] / sums["pairs"] == pytest.approx(
            logged[f"rewards/{side}"][0], rel=1e-5)


def test_orpos_odds_ratio_term_equals_trls_orpo_trainer(tmp_path, pair_run):
    """The odds-ratio term and the mean log-probs it is made of. The SFT terms differ by
    design: peftune's is the paper's NLL of y_w alone, TRL's takes the prompt's tokens too
    (as the ORPO authors' code does; trl#1516, kept by trl#2527)."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    built, batch = pair_run
    ours, sums = _peftune_loss(built, batch, {"name": "orpo", "lambda": 0.3})
    trainer = _trl_trainer(ORPOTrainer, ORPOConfig, built, tmp_path, PAIRS, reference=False,
                           beta=0.3)
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, trainer.data_collator(_legacy_features(batch)))
    logged = trainer._stored_metrics["train"]
    our_sft = -sums["chosen_logp"] / sums["chosen_length"]  # the step is this one batch
    assert (ours - our_sft).item() == pytest.approx((theirs - logged["nll_loss"][0]).item(),
                                                     rel=1e-5, abs=1e-6)
    _assert_same_rewards(sums, logged)  # λ x mean token log-prob


def test_kto_equals_trls_kto_trainer_with_the_batchs_own_kl_estimate(tmp_path, kto_run):
    from trl import KTOConfig, KTOTrainer

    built, batch = kto_run
    keys = {"name": "kto", "desirable_weight": 1.5, "undesirable_weight": 0.8}
    ours, sums = _peftune_loss(built, batch, keys)
    trainer = _trl_trainer(KTOTrainer, KTOConfig, built, tmp_path, kto_rows(PAIRS),
                           reference=True, beta=built.recipe.train.objective.beta,
                           desirable_weight=1.5, undesirable_weight=0.8)
    desirable = batch["roles"] == ROLE_DESIRABLE
    rows = [{"prompt_ids": prompt, "completion_ids": response, "KL_completion_ids": response,
             "label": bool(good)} for (prompt, response), good in zip(_examples(batch), desirable,
                                                                       strict=True)]
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, trainer.data_collator(rows))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    kl = trainer._metrics["train"]["kl"][0]
    assert sums["kl"] / sums["completions"] == pytest.approx(kl, rel=1e-4, abs=1e-7)
    assert kl > 0  # the KL term is in play, not clamped away
