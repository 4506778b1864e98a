"""Training objectives (`train.objective`): the loss of a micro-batch and the metrics it
reports. The loop knows none of them by name: it asks an objective what to count over the
optimizer step (`counts`), optionally for step-wide statistics from a gradient-free pass
(`step_sums`), then for each micro-batch's share of the step's loss (`loss`).

Notation (METHODS.md section 7): for a prompt x and a response y, log π(y|x) is the sum of the
policy's log-probs of y's tokens, log π_ref(y|x) the reference's (`reference.py`), |y| the
number of y's tokens, σ the logistic function, and for a pair y_w is the chosen response and
y_l the rejected one.

- `sft`: next-token cross-entropy over target tokens, summed and divided by the step's count.
- `dpo`: Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
  Secretly a Reward Model" (arXiv:2305.18290). h = [log π(y_w) - log π_ref(y_w)] -
  [log π(y_l) - log π_ref(y_l)]; loss = -log σ(βh), or with label smoothing ε the
  conservative form -(1-ε)·log σ(βh) - ε·log σ(-βh) (Mitchell 2023, "cDPO").
- `ln-dpo`: "The Hitchhiker's Guide to Human Alignment with *PO" (Saeidi et al. 2024,
  arXiv:2407.15229): DPO with each log-ratio divided by its response's length |y|.
- `ipo`: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences" (arXiv:2310.12036): (h - 1/(2β))², h from log-probs averaged over tokens.
- `orpo`: Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference
  Model" (arXiv:2403.07691): the SFT loss of y_w (mean token NLL) + λ·-log σ(log odds(y_w) -
  log odds(y_l)), odds(y) = P/(1-P) with P = exp(mean token log-prob of y).
- `simpo`: Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free
  Reward" (arXiv:2405.14734): -log σ(β/|y_w|·log π(y_w) - β/|y_l|·log π(y_l) - γ).
- `kto`: Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"
  (arXiv:2402.01306): unpaired; r = log π(y) - log π_ref(y), z = max(0, mean r over the
  optimizer step's completions), detached; a desirable completion's loss is
  λ_D·(1 - σ(β(r - z))), an undesirable one's λ_U·(1 - σ(β(z - r))); mean over completions.
  z is the batch estimate of KL(π‖π_ref) from the step's own completions (the paper's uses
  mismatched prompt/completion pairs of the batch), taken over the whole step on every
  process, so accumulation and processes do not change it.

Every loss is the mean over the optimizer step's pairs (completions for kto; tokens for sft
and ORPO's SFT term) on all processes: each micro-batch returns its sum divided by the step's
count, so grad_accum x batch_size and the number of processes do not change an update.

Metrics (summed over micro-batches, steps of a log window and processes, then divided):
reward = β·(log π - log π_ref) as each objective compares it (length-normalised for ln-dpo
and ipo; for the reference-free ones the scaled mean log-prob), reward accuracy = share of
pairs whose chosen reward is higher, margin = mean difference, the mean chosen and rejected
log π and response lengths.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from peftune.data.formats import IGNORE_INDEX, ROLE_DESIRABLE
from peftune.recipe.schema import ObjectiveSection
from peftune.train.loss import sequence_logps, token_loss_sum

Reference = Callable[[dict], Any]  # a batch -> each example's log π_ref(y|x), no gradient
PAIR_METRICS = ("reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward",
                "chosen_logp", "rejected_logp", "chosen_length", "rejected_length")


class Objective:
    """The loss the loop minimises; `sft` itself. Subclasses: the preference objectives."""

    name = "sft"
    uses_reference = False
    step_pass = False  # True: `step_sums` runs over the step's micro-batches first (no grad)
    unit = "targets"  # the count a step's loss is the mean over

    def __init__(self, config: ObjectiveSection, *, chunked: bool = True):
        self.config, self.chunked = config, chunked

    def counts(self, batch: dict) -> dict[str, float]:
        """What this micro-batch adds to the step's normalisers besides `targets` (target
        tokens) and `tokens`, which the loop counts for every objective."""
        return {}

    def step_sums(self, model: Any, batch: dict, reference: Reference | None) -> dict[str, float]:
        return {}

    def loss(self, model: Any, batch: dict, totals: dict[str, float],
             reference: Reference | None) -> tuple[Any, dict[str, float]]:
        """This micro-batch's share of the step's loss, and the metric sums it adds."""
        total = token_loss_sum(model, batch, chunked=self.chunked)
        return total / max(totals["targets"], 1.0), {}

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        """The metrics a log line reports, from sums over micro-batches, steps and processes."""
        return {}


class PairObjective(Objective, abc.ABC):
    """A loss over (chosen, rejected) pairs; the pair's two examples are adjacent in a batch
    (chosen first) and `pair_loss` turns their log-probs into each pair's loss."""

    unit = "pairs"
    normalised = False  # log-probs divided by response length before the loss

    def counts(self, batch: dict) -> dict[str, float]:
        return {"pairs": float(len(batch["roles"]) // 2)}

    def loss(self, model: Any, batch: dict, totals: dict[str, float],
             reference: Reference | None) -> tuple[Any, dict[str, float]]:
        logps, lengths = sequence_logps(model, batch, chunked=self.chunked)
        ref = reference(batch) if self.uses_reference else None
        per_pair, rewards = self.pair_loss(logps.view(-1, 2), lengths.view(-1, 2).to(logps.dtype),
                                           None if ref is None else ref.view(-1, 2))
        loss = per_pair.sum() / max(totals["pairs"], 1.0)
        extra = self.extra_loss(logps.view(-1, 2), lengths.view(-1, 2), totals)
        if extra is not None:
            loss = loss + extra
        return loss, pair_metrics(logps.detach().view(-1, 2), lengths.view(-1, 2),
                                  rewards.detach())

    @abc.abstractmethod
    def pair_loss(self, logps: Any, lengths: Any, ref: Any) -> tuple[Any, Any]:
        """Each pair's loss and its (chosen, rejected) rewards; logps/lengths/ref (P, 2)."""

    def extra_loss(self, logps: Any, lengths: Any, totals: dict[str, float]) -> Any:
        return None

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        pairs = max(sums.get("pairs", 0.0), 1.0)
        return {name: sums.get(name, 0.0) / pairs for name in PAIR_METRICS}


def pair_metrics(logps: Any, lengths: Any, rewards: Any) -> dict[str, float]:
    """The metric sums of P pairs (each argument (P, 2): chosen, rejected)."""
    margin = rewards[:, 0] - rewards[:, 1]
    return {"pairs": float(len(logps)), "reward_accuracy": float((margin > 0).sum()),
            "reward_margin": float(margin.sum()),
            "chosen_reward": float(rewards[:, 0].sum()),
            "rejected_reward": float(rewards[:, 1].sum()),
            "chosen_logp": float(logps[:, 0].sum()), "rejected_logp": float(logps[:, 1].sum()),
            "chosen_length": float(lengths[:, 0].sum()),
            "rejected_length": float(lengths[:, 1].sum())}


def sigmoid_loss(h: Any, beta: float, smoothing: float) -> Any:
    """-(1-ε)·log σ(βh) - ε·log σ(-βh)."""
    loss = -F.logsigmoid(beta * h) * (1 - smoothing)
    if smoothing:
        loss = loss - F.logsigmoid(-beta * h) * smoothing
    return loss


class Dpo(PairObjective):
    name = "dpo"
    uses_reference = True

    def pair_loss(self, logps: Any, lengths: Any, ref: Any) -> tuple[Any, Any]:
        ratios = logps - ref
        if self.normalised:
            ratios = ratios / lengths
        h = ratios[:, 0] - ratios[:, 1]
        beta = self.config.beta
        return sigmoid_loss(h, beta, self.config.label_smoothing), beta * ratios


class LnDpo(Dpo):
    name = "ln-dpo"
    normalised = True


class Ipo(PairObjective):
    name = "ipo"
    uses_reference = True

    def pair_loss(self, logps: Any, lengths: Any, ref: Any) -> tuple[Any, Any]:
        ratios = (logps - ref) / lengths
        h = ratios[:, 0] - ratios[:, 1]
        beta = self.config.beta
        return (h - 1 / (2 * beta)) ** 2, beta * ratios


class Simpo(PairObjective):
    name = "simpo"

    def pair_loss(self, logps: Any, lengths: Any, ref: Any) -> tuple[Any, Any]:
        rewards = self.config.beta * logps / lengths
        return -F.logsigmoid(rewards[:, 0] - rewards[:, 1] - self.config.gamma), rewards


class Orpo(PairObjective):
    name = "orpo"

    def counts(self, batch: dict) -> dict[str, float]:
        chosen = batch["roles"][0::2]  # the chosen example of every pair: its target tokens
        owner = batch["segment_ids"][:, 1:][batch["labels"][:, 1:] != IGNORE_INDEX]
        tokens = (owner % 2 == 0).sum()  # pairs are adjacent, chosen first: even examples
        return {"pairs": float(len(chosen)), "chosen_tokens": float(tokens)}

    def pair_loss(self, logps: Any, lengths: Any, ref: Any) -> tuple[Any, Any]:
        mean = logps / lengths
        # log odds = log P - log(1 - P), P = exp(mean log-prob) < 1
        log_odds = mean - torch.log1p(-torch.exp(mean).clamp(max=1 - 1e-7))
        ratio = -F.logsigmoid(log_odds[:, 0] - log_odds[:, 1])
        return self.config.lambda_ * ratio, self.config.lambda_ * mean

    def extra_loss(self, logps: Any, lengths: Any, totals: dict[str, float]) -> Any:
        return -logps[:, 0].sum() / max(totals["chosen_tokens"], 1.0)  # the SFT term on y_w


class Kto(Objective):
    name = "kto"
    uses_reference = True
    step_pass = True
    unit = "completions"

    def counts(self, batch: dict) -> dict[str, float]:
        return {"completions": float(len(batch["roles"]))}

    def step_sums(self, model: Any, batch: dict, reference: Reference | None) -> dict[str, float]:
        with torch.no_grad():
            logps, _ = sequence_logps(model, batch, chunked=self.chunked)
            return {"log_ratio": float((logps - reference(batch)).sum())}

    def loss(self, model: Any, batch: dict, totals: dict[str, float],
             reference: Reference | None) -> tuple[Any, dict[str, float]]:
        logps, lengths = sequence_logps(model, batch, chunked=self.chunked)
        ratio = logps - reference(batch)
        z = max(totals["log_ratio"] / max(totals["completions"], 1.0), 0.0)
        desirable = batch["roles"].to(logps.device) == ROLE_DESIRABLE
        beta, cfg = self.config.beta, self.config
        losses = torch.where(desirable, cfg.desirable_weight * (1 - torch.sigmoid(beta * (ratio - z))),
                             cfg.undesirable_weight * (1 - torch.sigmoid(beta * (z - ratio))))
        rewards = (beta * ratio).detach()
        sums = {"completions": float(len(ratio)), "desirable": float(desirable.sum()),
                "desirable_reward": float(rewards[desirable].sum()),
                "undesirable_reward": float(rewards[~desirable].sum()),
                "desirable_logp": float(logps.detach()[desirable].sum()),
                "undesirable_logp": float(logps.detach()[~desirable].sum()),
                "kl": z * len(ratio)}
        return losses.sum() / max(totals["completions"], 1.0), sums

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        good = max(sums.get("desirable", 0.0), 1.0)
        bad = max(sums.get("completions", 0.0) - sums.get("desirable", 0.0), 1.0)
        out = {"desirable_reward": sums.get("desirable_reward", 0.0) / good,
               "undesirable_reward": sums.get("undesirable_reward", 0.0) / bad,
               "desirable_logp": sums.get("desirable_logp", 0.0) / good,
               "undesirable_logp": sums.get("undesirable_logp", 0.0) / bad,
               "kl": sums.get("kl", 0.0) / max(sums.get("completions", 0.0), 1.0)}
        out["reward_margin"] = out["desirable_reward"] - out["undesirable_reward"]
        return out


OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls for cls in (Objective, Dpo, LnDpo, Ipo, Orpo, Simpo, Kto)}


def build_objective(config: ObjectiveSection, *, chunked: bool = True) -> Objective:
    return OBJECTIVES[config.name](config, chunked=chunked)
