"""IST (`train.strategy: {name: ist}`): Yao et al. 2024, "Layer-wise Importance Matters: Less
Memory for Better Performance in Parameter-efficient Fine-tuning of Large Language Models"
(Importance-aware Sparse Tuning), arXiv:2410.11772.

Of the L decoder layers that hold trainable PEFT parameters, only `layers` = k train at a
time: every `interval` optimizer steps (the paper: every step) k layers are drawn without
replacement with probability proportional to σ(-s_l), s the layers' scores; the other
layers' PEFT parameters are frozen (requires_grad off, no gradient: neither gradients nor
the activations only they would need are kept; their optimizer state is kept for when they
are drawn again). Parameters outside the decoder layers always train. The freezing is
LISA's (peftune.train.layer_sampling), applied to the PEFT parameters instead of whole layers.

The scores come from response suppression, every `score_interval` steps (the paper: 10),
before that step's update, on that step's batch: `score_trials` = T distinct draws S_j of
`score_layers` = m layers (default L/2), each with probability ∝ σ(s_l), have their modules'
response suppressed, and the loss L_j of the batch is measured (forward passes only).
Rewards are r_j = exp(-L_j) - mean_j exp(-L_j), and for every l in S_j,

    s_l ← s_l + η · r_j · σ(s_l)(1 - σ(s_l)),      η = `score_lr` (the paper: 10),

a REINFORCE step on the sigmoid of the score (σ taken before the update). A layer whose
suppression lowers the loss gains score and is trained less; one whose suppression hurts
keeps a low score and is trained more (σ(-s) is the training draw's weight).

Suppression, generically for any method: each PEFT parameter p of the layer is moved toward
its value at the start of training, p ← p0 + f·(p - p0), f = `suppression` (0.25), for the
trial's forward pass and then restored exactly. To first order this scales the layer's learned
response by f, the paper's scaling of the PEFT modules' output (exact for a LoRA's B, which
starts at zero); the copy of p0 costs one adapter's worth of memory.

Determinism: draws use `numpy.random.default_rng([train.seed, period, 0])` (training) and
`[train.seed, step, 1]` (trials) over scores that every process computes from the same
all-reduced losses, so every DDP rank freezes the same layers with no extra communication.
The checkpoint holds the scores (float64) and the current draw, so a resumed run is bitwise
the uninterrupted one; p0 is the adapter as initialised, which a resume rebuilds identically.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from peftune.adapters.hooks import AdapterHooks
from peftune.errors import InputError
from peftune.train.layer_sampling import LayerSampler

IST_SCORES = "peftune.ist.scores"  # the layers' importance scores in a checkpoint
IST_ACTIVE = "peftune.ist.active"  # [period, active layer indices...]


class IstSampler(LayerSampler):
    """IST's importance-sampled layers over `model`'s PEFT parameters (module docstring)."""

    def __init__(self, model: Any, *, layers: int, interval: int, score_interval: int,
                 score_trials: int, score_layers: int | None, suppression: float,
                 score_lr: float, seed: int) -> None:
        import torch

        super().__init__(model, layers=layers, seed=seed,
                         params_of=lambda block: [p for p in block.parameters() if p.requires_grad])
        self._add_per_layer_lists(model)
        # the layers with PEFT parameters (an adapter may target only some layers)
        self.candidates = [i for i, params in enumerate(self.layer_params) if params]
        if not self.candidates:
            raise InputError("train.strategy: strategy ist draws the PEFT modules of decoder "
                             "layers, and this adapter has none per layer (prompt and prefix "
                             "methods train outside the layers); use another method or no "
                             "strategy")
        n = len(self.candidates)
        if layers > n:
            raise InputError(f"train.strategy.layers: {layers} active layers is more than the "
                             f"{n} decoder layers with PEFT modules; use at most {n}")
        score_layers = max(1, n // 2) if score_layers is None else score_layers
        if score_layers > n:
            raise InputError(f"train.strategy.score_layers: {score_layers} suppressed layers is "
                             f"more than the {n} decoder layers with PEFT modules; use at most {n}")
        self.interval, self.score_interval = interval, score_interval
        self.score_trials, self.score_layers = score_trials, score_layers
        self.suppression, self.score_lr = suppression, score_lr
        self.scores = torch.zeros(n, dtype=torch.float64)
        self.period = 0
        self.start = [[p.detach().clone() for p in params] for params in self.layer_params]

    def _add_per_layer_lists(self, model: Any) -> None:
        """PEFT modules kept beside the decoder in a list with one entry per layer (bottleneck
        adapters and Compacter hook theirs in from `model.<attribute>.layers`) count as those
        layers' own; parameters shared by all layers (Compacter's rule) always train."""
        import torch

        seen = {id(p) for params in self.layer_params for p in params}
        for module in model.modules():
            if (not isinstance(module, torch.nn.ModuleList) or len(module) != len(self.blocks)
                    or module[0] is self.blocks[0]):
                continue
            for index, item in enumerate(module):
                own = [p for p in item.parameters() if p.requires_grad and id(p) not in seen]
                self.layer_params[index] += own
                seen.update(id(p) for p in own)

    @classmethod
    def from_config(cls, model: Any, strategy: Any, *, seed: int) -> IstSampler:
        return cls(model, layers=strategy.layers, interval=strategy.interval,
                   score_interval=strategy.score_interval, score_trials=strategy.score_trials,
                   score_layers=strategy.score_layers, suppression=strategy.suppression,
                   score_lr=strategy.score_lr, seed=seed)

    def hooks(self, hooks: AdapterHooks) -> AdapterHooks:
        """The method's hooks with IST's: scoring and drawing before each step; checkpoint
        and export with every PEFT parameter (the method selects them by requires_grad)."""
        def export(model: Any, out_dir: Any, tokenizer: Any) -> None:
            with self.all_trainable():
                hooks.export(model, out_dir, tokenizer)

        return replace(hooks, before_step=[*hooks.before_step, self.before_step], export=export,
                       trainable_state=lambda model: self.trainable_state(hooks, model),
                       load_trainable_state=lambda model, state: self.load_trainable_state(
                           hooks, model, state))

    # ---- the draws ---------------------------------------------------------------------------

    def probabilities(self, sign: float) -> Any:
        """σ(sign · s) over the candidate layers, normalised to a distribution."""
        weights = (sign * self.scores).sigmoid().numpy()
        return weights / weights.sum()

    def draw(self, period: int) -> list[int]:
        """The layers (model indices) that train during `period`: k by σ(-s), no repeats."""
        import numpy as np

        rng = np.random.default_rng([self.seed, period, 0])
        chosen = rng.choice(len(self.candidates), self.layers, replace=False,
                            p=self.probabilities(-1.0))
        return sorted(self.candidates[int(i)] for i in chosen)

    def trial_draws(self, step: int) -> list[tuple[int, ...]]:
        """Up to `score_trials` distinct sets of `score_layers` candidates, by σ(s)."""
        import numpy as np

        rng = np.random.default_rng([self.seed, step, 1])
        draws: list[tuple[int, ...]] = []
        for _ in range(20 * self.score_trials):  # few distinct sets exist on a small model
            if len(draws) == self.score_trials:
                break
            chosen = rng.choice(len(self.candidates), self.score_layers, replace=False,
                                p=self.probabilities(1.0))
            trial = tuple(sorted(int(i) for i in chosen))
            if trial not in draws:
                draws.append(trial)
        return draws

    def before_step(self, model: Any, step: int, step_loss: Callable[[], float]) -> None:
        if step > 0 and step % self.score_interval == 0:
            self.update_scores(step, step_loss)
        if step % self.interval == 0:
            self.period = step // self.interval
            self.active = self.draw(self.period)
            self.apply()

    # ---- the scores --------------------------------------------------------------------------

    def update_scores(self, step: int, step_loss: Callable[[], float]) -> list[float]:
        """One round of response suppression (module docstring); the trials' losses."""
        draws = self.trial_draws(step)
        losses = [self.suppressed_loss(trial, step_loss) for trial in draws]
        if len(draws) < 2 or not all(math.isfinite(loss) for loss in losses):
            return losses  # no contrast between draws, or a loss the loop will report
        rewards = [math.exp(-loss) for loss in losses]
        mean = sum(rewards) / len(rewards)
        prob = self.scores.sigmoid()
        slope = prob * (1 - prob)
        for trial, reward in zip(draws, rewards, strict=True):
            index = list(trial)
            self.scores[index] += self.score_lr * (reward - mean) * slope[index]
        return losses

    def suppressed_loss(self, trial: tuple[int, ...], step_loss: Callable[[], float]) -> float:
        """The step's loss with the PEFT parameters of the trial's layers moved to
        p0 + f·(p - p0); they are restored exactly afterwards."""
        import torch

        moved = [(p, p0) for i in trial for p, p0 in zip(self.layer_params[self.candidates[i]],
                                                           self.start[self.candidates[i]],
                                                           strict=True)]
        kept = [p.detach().clone() for p, _ in moved]
        try:
            with torch.no_grad():
                for p, p0 in moved:
                    p.lerp_(p0, 1.0 - self.suppression)
            return step_loss()
        finally:
            with torch.no_grad():
                for (p, _), value in zip(moved, kept, strict=True):
                    p.copy_(value)

    # ---- checkpoints -------------------------------------------------------------------------

    def trainable_state(self, hooks: AdapterHooks, model: Any) -> dict:
        import torch

        with self.all_trainable():
            state = hooks.trainable_state(model)
        state[IST_SCORES] = self.scores.clone()
        state[IST_ACTIVE] = torch.tensor([self.period, *self.active], dtype=torch.int64)
        return state

    def load_trainable_state(self, hooks: AdapterHooks, model: Any, state: dict) -> None:
        state = dict(state)
        scores, active = state.pop(IST_SCORES, None), state.pop(IST_ACTIVE, None)
        if scores is None or active is None or scores.shape != self.scores.shape:
            raise ValueError("checkpoint does not match the model: it was not written by an "
                             "IST run of this model")
        with self.all_trainable():
            hooks.load_trainable_state(model, state)
        self.scores = scores.to(self.scores.dtype).clone()
        self.period, self.active = int(active[0]), [int(i) for i in active[1:]]
        self.applied = False  # frozen again at the next forward
