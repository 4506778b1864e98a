"""The next-token loss without the full logits.

A causal LM's output head turns every position's hidden state into a row of vocabulary
logits; for the models users fine-tune (vocabularies of 32k-256k) those rows, the saved
log-softmax and its gradient are the largest activations of a step, larger than the
model's own weights on small models. Only positions that have a target (label != -100:
not prompts, not padding) need a row, and no row needs to live longer than its chunk:

- during the model's forward the head is replaced, for that one call, by `LossHead`,
  which gathers the hidden states of the target positions and applies the real head to
  them a chunk at a time (about 2^24 logits per chunk);
- training (gradients wanted): each chunk's loss is differentiated on the spot with respect
  to its hidden states (and to the head's own trainable weights, if any), the chunk's
  logits are freed, and the backward pass only scales the stored gradients by the
  incoming one (`FusedHeadLoss`; the idea of Liger-Kernel's fused linear cross-entropy,
  written here for any head module: a tied embedding, a LoRA-adapted or quantized head).
  Under a sharding engine a trainable head takes the plain route of autograd, each
  chunk checkpointed instead (its logits recomputed in the backward pass);
- evaluation: chunks under no_grad, summed per row when asked.

Exact: the loss and every gradient are the full computation's up to float rounding
(tests/test_loss.py). Models whose forward changes the logits after the head (logit
soft-capping or scaling) take the plain path, as does any model whose head cannot be
found; that is said once.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from peftune.data.formats import IGNORE_INDEX
from peftune.errors import TrainingError

logger = logging.getLogger(__name__)

CHUNK_LOGITS = 1 << 24  # logits per chunk (64 MiB in fp32)
MIN_CHUNK_ROWS = 64  # rows per chunk at least, whatever the vocabulary
# Config fields of models that change the logits after the head: the chunked loss would skip it.
_POST_HEAD = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
_head_paths: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_said: set[str] = set()


def model_inputs(model: Any, batch: dict) -> dict:
    """What the model is called with: no mask wherever causal attention alone is exact.

    A row holding one example (then padding) needs nothing but the causal mask: real tokens
    never attend to the padding after them, and padding positions have no target. Only a
    packed row with several examples needs its block-causal mask, passed explicitly under
    SDPA and eager attention (cheaper than transformers deriving it from the position ids);
    flash attention takes the position ids alone (its variable-length path)."""
    from peftune.data import block_causal_mask

    inputs = {"input_ids": batch["input_ids"]}
    if "position_ids" in batch:
        positions = batch["position_ids"]
        if not several_examples_in_a_row(positions, batch["labels"]):
            return inputs
        inputs["position_ids"] = positions
        config = getattr(model, "config", None)
        attention = getattr(config, "_attn_implementation", None) or "sdpa"
        if attention == "sdpa":
            inputs["attention_mask"] = block_causal_mask(positions)
        elif attention == "eager":
            inputs["attention_mask"] = block_causal_mask(
                positions, dtype=model.get_input_embeddings().weight.dtype)
        return inputs
    if "attention_mask" in batch and not right_padded(batch["attention_mask"]):
        inputs["attention_mask"] = batch["attention_mask"]
    return inputs


def several_examples_in_a_row(position_ids: Any, labels: Any) -> bool:
    """Whether some packed row restarts its positions inside its real tokens (a second
    example), not only where its padding tail begins. Padding has no targets, so a restart
    at or after the position that predicts a row's last target does not matter."""
    restarts = position_ids[:, 1:] == 0
    if not bool(restarts.any()):
        return False
    width = labels.shape[1]
    index = torch.arange(width, device=labels.device).expand_as(labels)
    last_target = torch.where(labels != IGNORE_INDEX, index, -1).amax(dim=1, keepdim=True)
    return bool((restarts & (index[:, 1:] < last_target)).any())


def right_padded(attention_mask: Any) -> bool:
    """Whether every row is ones then zeros (causal attention alone is then exact)."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def token_loss_sum(model: Any, batch: dict, *, chunked: bool = True) -> Any:
    """Summed next-token cross-entropy over the batch's target tokens (labels != -100; label
    t is predicted from position t - 1), in float32. Methods that prepend virtual tokens see
    longer sequences; only the batch's own positions are scored."""
    targets = shifted_targets(batch["labels"])
    inputs = model_inputs(model, batch)
    if chunked and _head_path(model) is not None:
        with _loss_head(model, targets, per_row=False) as head:
            return head.returned(model(**inputs, use_cache=False).logits)
    return _plain_loss(model(**inputs, use_cache=False).logits, targets, per_row=False)


def target_nll_per_row(model: Any, inputs: dict, labels: Any, *, chunked: bool = True) -> Any:
    """Each row's summed target NLL (float64) for `model(**inputs)`; no gradients."""
    targets = shifted_targets(labels)
    if chunked and _head_path(model) is not None:
        with _loss_head(model, targets, per_row=True) as head:
            return head.returned(model(**inputs, use_cache=False).logits)
    return _plain_loss(model(**inputs, use_cache=False).logits, targets, per_row=True)


def sequence_logps(model: Any, batch: dict, *, chunked: bool = True) -> tuple[Any, Any]:
    """Each example's summed log-probability of its target tokens, log π(y|x) over the
    response (float32, differentiable when gradients are on), and its target-token count, in
    the order of `batch["roles"]`. Examples are told apart by `batch["segment_ids"]`
    (data.packing.sequence_keys); label t + 1, the target of position t, is scored for the
    example that token t + 1 belongs to. A model that prepends virtual tokens (prompt,
    prefix and p-tuning) gets one example per row: each example needs its own virtual
    tokens, and peft cannot join them to a pair's block-causal mask."""
    if _prepends_virtual_tokens(model):
        batch = one_example_per_row(batch)
    targets = shifted_targets(batch["labels"])
    owner = shifted_targets(batch["segment_ids"]).masked_fill(targets == IGNORE_INDEX, -1)
    count = len(batch["roles"])
    inputs = model_inputs(model, batch)
    if chunked and _head_path(model) is not None:
        with _loss_head(model, targets, per_row=False, segments=(owner, count)) as head:
            nll = head.returned(model(**inputs, use_cache=False).logits)
    else:
        nll = _plain_segment_nll(model(**inputs, use_cache=False).logits, targets, owner, count)
    scored = owner[owner >= 0]
    lengths = torch.bincount(scored, minlength=count)
    return -nll, lengths


def _prepends_virtual_tokens(model: Any) -> bool:
    config = getattr(_bare(model), "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def one_example_per_row(batch: dict) -> dict:
    """`batch` with each example of `segment_ids` moved to a row of its own (in example order,
    right-padded, labels -100 on padding); `roles` and `example_ids` keep their order."""
    segments = batch["segment_ids"]
    count = len(batch["roles"])
    where = [(segments == s).nonzero(as_tuple=True) for s in range(count)]
    width = max(len(rows) for rows, _ in where)
    input_ids = batch["input_ids"].new_zeros((count, width))
    labels = batch["labels"].new_full((count, width), IGNORE_INDEX)
    new_segments = segments.new_full((count, width), -1)
    mask = batch["input_ids"].new_zeros((count, width))
    for s, (rows, cols) in enumerate(where):
        n = len(cols)
        input_ids[s, :n] = batch["input_ids"][rows, cols]
        labels[s, :n] = batch["labels"][rows, cols]
        new_segments[s, :n], mask[s, :n] = s, 1
    return {**{k: v for k, v in batch.items() if k != "position_ids"}, "input_ids": input_ids,
            "labels": labels, "segment_ids": new_segments, "attention_mask": mask}


def _plain_segment_nll(logits: Any, targets: Any, owner: Any, count: int) -> Any:
    logits = logits[:, -targets.shape[1]:]
    scored = owner >= 0
    nll = F.cross_entropy(logits[scored].float(), targets[scored], reduction="none")
    return torch.zeros(count, dtype=nll.dtype, device=nll.device).index_add(0, owner[scored], nll)


def shifted_targets(labels: Any) -> Any:
    """Position t's target is label t + 1 (the labels shift, not the logits: no copy)."""
    pad = labels.new_full((labels.shape[0], 1), IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def _plain_loss(logits: Any, targets: Any, *, per_row: bool) -> Any:
    """The full-logits computation: the reference the chunked one equals."""
    logits = logits[:, -targets.shape[1]:]  # virtual tokens (prompt tuning) come first
    if not per_row:
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    scored = targets != IGNORE_INDEX
    nll = F.cross_entropy(logits[scored].float(), targets[scored], reduction="none")
    rows = torch.zeros(targets.shape[0], dtype=torch.float64, device=nll.device)
    return rows.index_add_(0, scored.nonzero()[:, 0], nll.double())


# --------------------------------------------------------------------------- the head


def _bare(model: Any) -> Any:
    """The model inside DDP / FSDP1 wrappers."""
    while hasattr(model, "module") and type(model).__name__ in (
            "DistributedDataParallel", "FullyShardedDataParallel", "DeepSpeedEngine"):
        model = model.module
    return model


def _head_path(model: Any) -> str | None:
    """Dotted name of the output head inside the (unwrapped) model, or None (plain path)."""
    model = _bare(model)
    if model in _head_paths:
        return _head_paths[model]
    path, reason = None, None
    config = getattr(model, "config", None)
    post = [name for name in _POST_HEAD if getattr(config, name, None) not in (None, 1, 1.0)]
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if post:
        reason = f"its forward changes the logits after the head ({post[0]})"
    elif head is None:
        reason = "its output head was not found"
    else:
        path = next((name for name, module in model.named_modules() if module is head), None)
        if not path:
            reason = "its output head is not a submodule"
    if reason is not None and reason not in _said:
        _said.add(reason)
        logger.warning("the loss is computed from the full logits: %s", reason)
    _head_paths[model] = path
    return path


@contextlib.contextmanager
def _loss_head(model: Any, targets: Any, *, per_row: bool, segments: tuple | None = None):
    """The model's head replaced by a `LossHead` for one forward."""
    bare = _bare(model)
    parent_name, _, name = _head_path(bare).rpartition(".")
    parent = bare.get_submodule(parent_name)
    head = getattr(parent, name)
    vocab = int(getattr(getattr(bare, "config", None), "vocab_size", 0) or 32000)
    sharded = bare is not model and type(model).__name__ != "DistributedDataParallel"
    sharded = sharded or hasattr(next(iter(head.parameters()), None), "device_mesh")
    loss_head = LossHead(head, targets, per_row=per_row, vocab=vocab, sharded=sharded,
                         segments=segments)
    setattr(parent, name, loss_head)
    try:
        yield loss_head
    finally:
        setattr(parent, name, head)


class LossHead(torch.nn.Module):
    """Takes the final hidden states where the head would, and returns the summed loss (or
    each row's, `per_row`, or each example's, `segments`) of the target positions, a chunk
    of rows at a time. `segments`: (owner, count), the example (0..count-1) each target
    position belongs to, -1 where none."""

    def __init__(self, head: Any, targets: Any, *, per_row: bool, vocab: int,
                 sharded: bool, segments: tuple | None = None) -> None:
        super().__init__()
        self.head = head
        self.targets, self.per_row, self.sharded = targets, per_row, sharded
        self.segments = segments
        self.chunk = max(MIN_CHUNK_ROWS, CHUNK_LOGITS // max(vocab, 1))
        self.result: Any = None

    def returned(self, logits: Any) -> Any:
        """The model's output `logits`, which must be this head's result unchanged (DDP may
        hand it back through an autograd node of its own: the same values)."""
        result = self.result
        changed = logits is not result and (
            getattr(logits, "shape", None) != result.shape
            or not torch.equal(logits.detach(), result.detach()))
        if changed:
            raise TrainingError(
                "the model changed its output head's result after the head, so the loss "
                "cannot be computed in chunks; set train.chunked_loss: false")
        return logits

    def forward(self, hidden: Any) -> Any:
        self.result = self._loss(hidden)
        return self.result

    def _loss(self, hidden: Any) -> Any:
        targets = self.targets
        hidden = hidden[:, -targets.shape[1]:]  # virtual tokens (prompt tuning) come first
        flat_targets = targets.flatten()
        where = (flat_targets != IGNORE_INDEX).nonzero().squeeze(1)
        states = hidden.flatten(0, 1).index_select(0, where)
        wanted = flat_targets.index_select(0, where)
        pieces = [(states[s:s + self.chunk], wanted[s:s + self.chunk])
                  for s in range(0, len(wanted), self.chunk)]
        if self.segments is not None:
            owner, count = self.segments
            return self._segment_loss(states, wanted, owner.flatten().index_select(0, where),
                                      count, pieces)
        if self.per_row:
            with torch.no_grad():
                nll = [_chunk_nll(self.head, h, y, reduction="none") for h, y in pieces]
                rows = torch.zeros(targets.shape[0], dtype=torch.float64, device=hidden.device)
                if nll:
                    rows.index_add_(0, where // targets.shape[1], torch.cat(nll).double())
                return rows
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        params = [p for p in self.head.parameters() if p.requires_grad]
        if not torch.is_grad_enabled() or not (states.requires_grad or params):
            with torch.no_grad():
                for h, y in pieces:
                    total += _chunk_nll(self.head, h, y)
            return total
        if params and self.sharded:  # the engine's own hooks must see the head's gradients
            for h, y in pieces:
                total = total + checkpoint(_chunk_nll, self.head, h, y, use_reentrant=False)
            return total
        return FusedHeadLoss.apply(states, wanted, self.head, self.chunk, *params)


    def _segment_loss(self, states: Any, wanted: Any, owner: Any, count: int,
                      pieces: list) -> Any:
        """Each example's summed NLL (float32): fused where the head has nothing to train,
        else each chunk checkpointed (its logits recomputed in the backward pass)."""
        total = torch.zeros(count, dtype=torch.float32, device=states.device)
        params = [p for p in self.head.parameters() if p.requires_grad]
        owners = [owner[s:s + self.chunk] for s in range(0, len(wanted), self.chunk)]
        if not torch.is_grad_enabled() or not (states.requires_grad or params):
            with torch.no_grad():
                for (h, y), o in zip(pieces, owners, strict=True):
                    total.index_add_(0, o, _chunk_nll(self.head, h, y, reduction="none"))
            return total
        if params or self.sharded:
            for (h, y), o in zip(pieces, owners, strict=True):
                total = total + checkpoint(_chunk_segment_nll, self.head, h, y, o, count,
                                           use_reentrant=False)
            return total
        return FusedSegmentLoss.apply(states, wanted, owner, count, self.head, self.chunk)


class FusedSegmentLoss(torch.autograd.Function):
    """Each example's NLL of `head(states)` against `wanted` (`owner`: the example of each
    state), for a head with nothing to train. A state's logits reach only its own token's
    loss, so the gradient of every token's loss with respect to its state is taken chunk by
    chunk in the forward pass (no chunk's logits outlive it); the backward pass scales each
    state's by the incoming gradient of its example."""

    @staticmethod
    def forward(ctx: Any, states: Any, wanted: Any, owner: Any, count: int, head: Any,
                chunk: int) -> Any:
        grad_states = torch.empty_like(states)
        total = torch.zeros(count, dtype=torch.float32, device=states.device)
        for s in range(0, len(wanted), chunk):
            with torch.enable_grad():
                piece = states[s:s + chunk].detach().requires_grad_(True)
                nll = _chunk_nll(head, piece, wanted[s:s + chunk], reduction="none")
                summed = nll.sum()
            grad_states[s:s + chunk] = torch.autograd.grad(summed, piece)[0]
            total.index_add_(0, owner[s:s + chunk], nll.detach())
        ctx.save_for_backward(grad_states, owner)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: Any) -> Any:
        grad_states, owner = ctx.saved_tensors
        scale = grad_output.index_select(0, owner).to(grad_states.dtype)
        return grad_states * scale[:, None], None, None, None, None, None


def _chunk_segment_nll(head: Any, states: Any, wanted: Any, owner: Any, count: int) -> Any:
    nll = _chunk_nll(head, states, wanted, reduction="none")
    return torch.zeros(count, dtype=nll.dtype, device=nll.device).index_add(0, owner, nll)


class FusedHeadLoss(torch.autograd.Function):
    """The loss of `head(states)` against `wanted`, its gradients taken chunk by chunk in the
    forward pass (so no chunk's logits outlive it); the backward pass scales them by the
    incoming gradient."""

    @staticmethod
    def forward(ctx: Any, states: Any, wanted: Any, head: Any, chunk: int, *params: Any) -> Any:
        grad_states = torch.empty_like(states)
        grad_params = [torch.zeros_like(p) for p in params]
        total = torch.zeros((), dtype=torch.float32, device=states.device)
        for s in range(0, len(wanted), chunk):
            with torch.enable_grad():
                piece = states[s:s + chunk].detach().requires_grad_(True)
                loss = _chunk_nll(head, piece, wanted[s:s + chunk])
            grads = torch.autograd.grad(loss, [piece, *params])
            grad_states[s:s + chunk] = grads[0]
            for acc, grad in zip(grad_params, grads[1:], strict=True):
                acc.add_(grad)
            total += loss.detach()
        ctx.save_for_backward(grad_states, *grad_params)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: Any) -> Any:
        grad_states, *grad_params = ctx.saved_tensors
        return (grad_states * grad_output.to(grad_states.dtype), None, None, None,
                *(g * grad_output.to(g.dtype) for g in grad_params))


def _chunk_nll(head: Any, states: Any, wanted: Any, reduction: str = "sum") -> Any:
    return F.cross_entropy(head(states).float(), wanted, reduction=reduction)
