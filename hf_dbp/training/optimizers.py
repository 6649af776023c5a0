"""The optimizers a user would pick instead of (or together with) DBP: torch's Muon or SOAP (from pytorch-optimizer)
for the hidden matrices, AdamW for the rest, as one optimizer that Trainer, its schedulers and its checkpoints handle
like any other. (Schedule-free AdamW needs nothing here: it is transformers' own `--optim schedule_free_adamw`.)

DBP is independent of the optimizer: R is updated by the decorrelation step, never by an optimizer, so every choice
here leaves R out (it requires no grad), and DBP with Muon is Muon on the weights plus the decorrelation step.
"""

from __future__ import annotations

import re

import torch
from torch import nn

MATRIX_OPTIMIZERS = ("adamw", "muon", "soap")
"""`DBPTrainingArguments.matrix_optimizer`: what updates the 2-D hidden weight matrices."""

OUTPUT_LAYERS = r"(^|\.)(decoder_pred|lm_head|classifier|head)(\.|$)"
"""Linear layers that are outputs rather than hidden layers: Muon is for hidden matrices, these stay with AdamW (as
in Muon's own recipe, which keeps embeddings and the output head on AdamW)."""


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers over disjoint parameter groups, stepped together, seen as one.

    Why by hand: torch has no such wrapper (only `ChainedScheduler` for schedulers), and Trainer, accelerate and the
    learning-rate schedulers all take a single optimizer. The parameter groups are the inner optimizers' own dicts
    (so a scheduler setting `lr` reaches them) and the state is one dict shared by all, so the generic
    `state_dict` saves everything and `load_state_dict` restores it.
    """

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = list(optimizers)
        # add_param_group keeps each group dict as given: the inner optimizers' groups are shared, not copied.
        super().__init__([group for o in self.optimizers for group in o.param_groups], defaults={})
        self._share_groups_and_state()

    def _share_groups_and_state(self) -> None:
        start = 0
        for optimizer in self.optimizers:
            count = len(optimizer.param_groups)
            optimizer.param_groups = self.param_groups[start : start + count]
            optimizer.state = self.state
            start += count

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # replaces the group dicts and the state: share the new ones
        self._share_groups_and_state()


def muon_matrices(model: nn.Module) -> list[str]:
    """Names of the parameters Muon takes: the trainable 2-D weights of the hidden linear layers (`nn.Linear` and
    transformers' `Conv1D`), not embeddings, convolutions, norms, biases or output layers (see `OUTPUT_LAYERS`)."""
    names = []
    for module_name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        # 2-D only: norms (1-D) and convolutions (4-D) drop out here; embeddings are 2-D but not hidden matrices.
        if isinstance(module, nn.Embedding) or not isinstance(weight, nn.Parameter) or weight.ndim != 2:
            continue
        if re.search(OUTPUT_LAYERS, module_name):
            continue
        if weight.requires_grad:
            names.append(f"{module_name}.weight" if module_name else "weight")
    return names


def matrices_with_adamw(
    model: nn.Module,
    matrix_optimizer: str,
    learning_rate: float,
    weight_decay: float,
    decay_parameters: set[str] | list[str],
    adam_betas: tuple[float, float] = (0.9, 0.999),
    adam_epsilon: float = 1e-8,
    muon_lr_multiplier: float = 1.0,
    muon_momentum: float = 0.95,
) -> CombinedOptimizer:
    """`matrix_optimizer` on the hidden matrices (`muon_matrices`) and `torch.optim.AdamW` on every other trainable
    parameter, as one `CombinedOptimizer`.

    - `"muon"`: `torch.optim.Muon` with its updates scaled to AdamW's RMS (`adjust_lr_fn="match_rms_adamw"`),
      so both share the learning-rate scale: Muon runs at `learning_rate * muon_lr_multiplier`.
    - `"soap"`: `pytorch_optimizer.SOAP` (Adam in Shampoo's eigenbasis) at `learning_rate` with AdamW's betas and
      epsilon. Why that package: torch and transformers have no SOAP, and pytorch-optimizer is maintained and tested.
      As in the SOAP paper, the 1-D parameters stay with Adam(W).

    `decay_parameters` (Trainer's `get_decay_parameter_names`) decides which AdamW parameters get weight decay;
    every matrix does.
    """
    if matrix_optimizer not in MATRIX_OPTIMIZERS or matrix_optimizer == "adamw":
        raise ValueError(
            f"matrix_optimizer must be one of {[o for o in MATRIX_OPTIMIZERS if o != 'adamw']}, got "
            f"{matrix_optimizer!r}"
        )
    matrices = set(muon_matrices(model))
    if not matrices:
        raise ValueError(f"{type(model).__name__} has no trainable hidden 2-D weight matrix for {matrix_optimizer}")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for n, p in trainable if n in matrices]
    if matrix_optimizer == "muon":
        first = torch.optim.Muon(
            params,
            lr=learning_rate * muon_lr_multiplier,
            weight_decay=weight_decay,
            momentum=muon_momentum,
            adjust_lr_fn="match_rms_adamw",
        )
    else:
        try:
            from pytorch_optimizer import SOAP
        except ImportError as error:
            raise ImportError(
                "matrix_optimizer='soap' needs pytorch-optimizer: pip install pytorch-optimizer"
            ) from error
        first = SOAP(params, lr=learning_rate, betas=adam_betas, weight_decay=weight_decay, eps=adam_epsilon)
    rest = [(n, p) for n, p in trainable if n not in matrices]
    groups = [
        {"params": [p for n, p in rest if n in decay_parameters], "weight_decay": weight_decay},
        {"params": [p for n, p in rest if n not in decay_parameters], "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]
    if not groups:
        return CombinedOptimizer([first])
    return CombinedOptimizer([first, torch.optim.AdamW(groups, lr=learning_rate, betas=adam_betas, eps=adam_epsilon)])


def muon_with_adamw(
    model: nn.Module, learning_rate: float, weight_decay: float, decay_parameters: set[str] | list[str], **kwargs
) -> CombinedOptimizer:
    """`torch.optim.Muon` on the hidden matrices and AdamW on the rest: `matrices_with_adamw` with `"muon"`."""
    return matrices_with_adamw(model, "muon", learning_rate, weight_decay, decay_parameters, **kwargs)
