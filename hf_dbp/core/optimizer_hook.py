"""DBP in any training loop, in one line: the decorrelation step after every real optimizer step.

```python
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
hook = hf_dbp.attach_decorrelation(optimizer, model)  # then train as usual: loss.backward(); optimizer.step()
```

Why an optimizer hook: torch's `Optimizer.register_step_post_hook` fires after every `optimizer.step()` that really
runs, whoever calls it (a plain loop, Accelerate, Lightning, transformers' Trainer, timm's train script), and only
then: inside `accelerator.accumulate` the wrapped optimizer skips its step until the gradients sync, and fp16's
`GradScaler.step` does not call `step()` when it skips one, so R is updated once per real step, with the statistics
of every forward since the last one (every gradient-accumulation micro-batch), on every process. DeepSpeed's own
optimizers (ZeRO, its fp16 and bf16 ones) are no torch optimizers and their inner torch optimizer steps once per
parameter group: there the step follows the DeepSpeed optimizer's `step()`, which its engine calls once per real step
(docs/engines.md).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from .collectives import resolve_transfer_dtype
from .decorrelation import Decorrelation
from .inject import DecorrelationMonitor, decorrelation_matrices, drop_decorrelation_matrices
from .model import decorrelation_config_of, decorrelation_modules, waiting_weight_gradients
from .plan import plan_decorrelation
from .sampling import RowSampler
from .step import PendingStatistics, begin_decorrelation_step, update_decorrelations

logger = logging.getLogger(__name__)

LR_SCHEDULES = ("constant", "tied")
"""R's learning rate over training: `"constant"` (the config's `lr` at every step) or `"tied"` (times the weights'
schedule factor: the same warm-up and decay as the optimizer's learning rate)."""
GUARDS = ("skip", "stop")
"""What to do with an update of R that would make it non-finite or comes from exploding statistics: `"skip"` it (R
stays, a warning) or `"stop"` the run with `hf_dbp.core.step.DecorrelationDiverged`."""


_WRAPPERS = ("AcceleratedOptimizer", "LightningOptimizer", "DeepSpeedOptimizerWrapper")
"""Optimizer wrappers whose `step()` calls the torch optimizer's only for real steps (Accelerate's DeepSpeed wrapper:
never; DeepSpeed's engine steps the optimizer inside it)."""

_DEEPSPEED_GROUPS = ("bit16_groups", "fp16_groups", "bf16_groups")
"""Where DeepSpeed's optimizers (ZeRO stages 1-3, its fp16 and bf16 optimizers) list the model's own parameters: their
`param_groups` hold flat fp32 copies."""


def is_deepspeed_optimizer(optimizer: Any) -> bool:
    """Whether `optimizer` is one of DeepSpeed's own (ZeRO, fp16, bf16): not a torch optimizer, and its inner torch
    optimizer steps once per parameter group (ZeRO-1/2) or sub-group (ZeRO-3) of a single real step."""
    return not isinstance(optimizer, torch.optim.Optimizer) and type(optimizer).__module__.startswith("deepspeed.")


def _torch_optimizer(optimizer: Any):
    """The optimizer inside Accelerate's `AcceleratedOptimizer` or Lightning's `LightningOptimizer`: a torch optimizer,
    or DeepSpeed's (see `is_deepspeed_optimizer`)."""
    while type(optimizer).__name__ in _WRAPPERS:
        optimizer = getattr(optimizer, "optimizer", None) or optimizer._optimizer
    if not (isinstance(optimizer, torch.optim.Optimizer) or is_deepspeed_optimizer(optimizer)):
        raise TypeError(f"attach_decorrelation needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer


def _parameter_ids(optimizer) -> set[int]:
    for name in _DEEPSPEED_GROUPS:
        groups = getattr(optimizer, name, None) if is_deepspeed_optimizer(optimizer) else None
        if groups:
            return {id(p) for group in groups for p in group}
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


class _DeepSpeedStepHook:
    """A post-step hook on one of DeepSpeed's optimizers, which offer none: their `step()` is wrapped on the instance.

    Their inner torch optimizer is no place for it: ZeRO steps it once per parameter group or sub-group of one real
    step. The engine calls `optimizer.step()` once per real step (at the gradient-accumulation boundary); on an fp16
    overflow that step returns early with `optimizer.overflow` set, and the hook does not fire.
    """

    def __init__(self, optimizer, hook) -> None:
        step = optimizer.step

        def step_then_hook(*args, **kwargs):
            result = step(*args, **kwargs)
            if not getattr(optimizer, "overflow", False):
                hook()
            return result

        self.optimizer = optimizer
        optimizer.step = step_then_hook

    def remove(self) -> None:
        self.optimizer.__dict__.pop("step", None)


class DecorrelationHook:
    """Takes the decorrelation step of a model's R after every real optimizer step (see `attach_decorrelation`).

    Also usable without an optimizer: call `step()` after each optimizer step yourself.

    Args:
        model (`nn.Module`):
            A decorrelated model (`hf_dbp.decorrelate`, a ViTMAE-DBP model, or a model holding one), or with
            `measure_only` a plain model.
        lr_scheduler (`torch.optim.lr_scheduler.LRScheduler`, *optional*):
            The weights' scheduler, for `lr_schedule="tied"`.
        lr_schedule (`str`, defaults to `"constant"`):
            One of `LR_SCHEDULES`.
        update_every (`int`, defaults to 1):
            Update R every this many optimizer steps, from the statistics of all of them (a k-th of the traffic
            between processes); the folded weights are reformed at every step.
        transfer_dtype (`str`, *optional*):
            `"bfloat16"` or `"float16"`: the statistics travel between processes in 16 bits.
        guard (`str`, defaults to `"skip"`):
            One of `GUARDS`.
        max_loss (`float`, defaults to 1e6):
            The decorrelation loss taken as exploded.
        gradient_accumulation_steps (`int`, defaults to 1):
            Micro-batches per optimizer step: above 1, every micro-batch of a step shares one folded `W R`.
        measure_only ([`DecorrelationConfig`], *optional*):
            For a plain model (the BP baseline): measure the decorrelation loss of the layers this config selects,
            without changing the model (R stays the identity, `lr = 0`).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        lr_scheduler=None,
        lr_schedule: str = "constant",
        update_every: int = 1,
        transfer_dtype: str | None = None,
        guard: str = "skip",
        max_loss: float = 1e6,
        gradient_accumulation_steps: int = 1,
        measure_only=None,
    ) -> None:
        self.check_options(lr_schedule, update_every, transfer_dtype, guard, max_loss)
        self.model = model
        self.monitor: DecorrelationMonitor | None = None
        config = decorrelation_config_of(model)
        has_matrices = bool(decorrelation_matrices(model))
        if measure_only is not None:
            if has_matrices or config is not None:
                raise ValueError(f"{type(model).__name__} is decorrelated: measure_only is for plain models")
            groups = measure_only.groups or plan_decorrelation(model, measure_only)
            self.monitor = DecorrelationMonitor(
                model, groups, measure_only.sample_fraction, RowSampler(measure_only.seed), measure_only.block_size
            )
            self._measure_kappa = measure_only.kappa
        elif config is None:
            what = "holds decorrelation matrices but no DecorrelationConfig" if has_matrices else "has no R"
            raise ValueError(
                f"{type(model).__name__} {what}: decorrelate it first (hf_dbp.decorrelate(model, config)), or pass "
                "measure_only=DecorrelationConfig(...) to measure a plain model"
            )
        self.lr_scheduler = lr_scheduler
        self.lr_schedule = lr_schedule
        self.update_every = update_every
        self.transfer_dtype = transfer_dtype
        self.guard = {"on_divergence": "raise" if guard == "stop" else "skip", "max_loss": max_loss}
        self.optimizer_steps = 0
        self.losses: list[float] = []
        self.pending: PendingStatistics | None = None
        self._skipped_reported = 0
        self._handle = None
        self._optimizer: torch.optim.Optimizer | None = None
        for R in decorrelation_matrices(model):
            R.requires_grad_(False)  # a user's model.requires_grad_(True) may have set it again
        for d in self.modules():
            d.reuse_fold_in_training = gradient_accumulation_steps > 1

    @staticmethod
    def check_options(
        lr_schedule: str = "constant", update_every: int = 1, transfer_dtype=None, guard: str = "skip", max_loss=1e6
    ) -> None:
        """Raise a `ValueError` naming the first option whose value cannot work."""
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {list(LR_SCHEDULES)}, got {lr_schedule!r}")
        if not (isinstance(update_every, int) and not isinstance(update_every, bool) and update_every >= 1):
            raise ValueError(f"update_every must be an integer >= 1, got {update_every!r}")
        if guard not in GUARDS:
            raise ValueError(f"guard must be one of {list(GUARDS)}, got {guard!r}")
        if not (isinstance(max_loss, (int, float)) and max_loss >= 0):
            raise ValueError(f"max_loss must be a number >= 0, got {max_loss!r}")
        resolve_transfer_dtype(transfer_dtype)

    def modules(self) -> list[Decorrelation]:
        """The `Decorrelation` modules this hook steps (the monitor's for a plain model)."""
        if self.monitor is not None:
            return list(self.monitor.decorrelations.values())
        return decorrelation_modules(self.model)

    def attach(self, optimizer) -> DecorrelationHook:
        """Step after every real `step()` of `optimizer` (the torch optimizer inside any wrapper, or DeepSpeed's)."""
        if self._handle is not None:
            raise ValueError("this DecorrelationHook is attached already; remove() it first")
        inner = _torch_optimizer(optimizer)
        if getattr(inner, "_hf_dbp_hook", None) is not None:
            raise ValueError(f"DBP is attached to this {type(inner).__name__} already: attach it once per optimizer")
        held = _parameter_ids(inner)
        weights = [p for p in self.model.parameters() if p.requires_grad]
        if weights and not any(id(p) in held for p in weights):
            raise ValueError(
                f"the {type(inner).__name__} holds none of {type(self.model).__name__}'s trainable parameters: "
                "attach DBP to the optimizer that trains this model (under DeepSpeed: the engine's optimizer)"
            )
        if is_deepspeed_optimizer(inner) and any(id(R) in held or hasattr(R, "ds_id") for R in self._matrices()):
            # DeepSpeed flattens what its optimizer holds and partitions every parameter under ZeRO-3: such an R would
            # be overwritten from the optimizer's copy, or split between the processes.
            raise ValueError(
                "DeepSpeed holds the decorrelation matrices R (in its optimizer, or partitioned by ZeRO-3): call "
                "hf_dbp.prepare_for_deepspeed(model) before deepspeed.initialize (DBPTrainer does)"
            )
        if dropped := drop_decorrelation_matrices(inner, self.model):
            logger.warning(
                "Removed %d decorrelation matrices R from the optimizer: R is updated by the decorrelation step, "
                "never by an optimizer.",
                dropped,
            )
        if is_deepspeed_optimizer(inner):
            self._handle = _DeepSpeedStepHook(inner, self.step)
        else:
            self._handle = inner.register_step_post_hook(lambda *_: self.step())
        self._optimizer = inner
        inner._hf_dbp_hook = self
        return self

    def _matrices(self) -> list[torch.Tensor]:
        return [d.R for d in self.modules()] if self.monitor is None else []

    def remove(self) -> None:
        """Detach from the optimizer: its steps no longer update R."""
        if self._handle is not None:
            self._handle.remove()
            self._optimizer._hf_dbp_hook = None
            self._handle = self._optimizer = None
        if self.monitor is not None:
            self.monitor.remove()

    def updates_now(self) -> bool:
        """Whether the next optimizer step is followed by an update of R (every `update_every`-th)."""
        return (self.optimizer_steps + 1) % self.update_every == 0

    def begin(self, process_group=None) -> None:
        """Start exchanging this step's statistics now, after the forward of its last micro-batch, so that over
        several processes they travel during the backward; the step after the optimizer's waits for them."""
        if self.pending is None and self.updates_now():
            self.pending = begin_decorrelation_step(self.modules(), process_group, self.transfer_dtype)

    def lr_scale(self) -> float:
        """1, or with `lr_schedule="tied"` the factor the weights' scheduler applied at the step just taken (the
        scheduler steps after the optimizer)."""
        if self.lr_schedule != "tied" or self.lr_scheduler is None:
            return 1.0
        base, last = self.lr_scheduler.base_lrs[0], self.lr_scheduler.get_last_lr()[0]
        return last / base if base else 1.0

    @torch.no_grad()
    def step(self) -> float | None:
        """The decorrelation step after one optimizer step; returns its mean decorrelation loss (None if nothing
        was measured)."""
        if waiting := waiting_weight_gradients(self.model):
            names = ", ".join(waiting[:3]) + (", ..." if len(waiting) > 3 else "")
            raise RuntimeError(
                f"the optimizer stepped while {len(waiting)} decorrelated layer(s) ({names}) still held fold "
                "gradients meant for W: the step ran without part of W's gradient. The function given to "
                "hf_dbp.defer_weight_gradients said the micro-batch was not the last of its step; give it the loop's "
                "own signal (accelerate's GradientState().sync_gradients) or None"
            )
        update, pending, self.pending = self.updates_now(), self.pending, None
        self.optimizer_steps += 1
        common = dict(pending=pending, transfer_dtype=self.transfer_dtype, update=update)
        if self.monitor is not None:
            loss = update_decorrelations(self.modules(), lr=0.0, kappa=self._measure_kappa, **common)
        else:
            config = decorrelation_config_of(self.model)  # read at every step: a change of the config applies at once
            lr = config.lr * self.lr_scale()
            loss = update_decorrelations(
                self.modules(), lr, config.kappa, variance_form=config.variance_form, **common, **self.guard
            )
        if loss is not None and math.isfinite(loss):
            self.losses.append(loss)
        skipped = self.skipped_updates()
        if skipped > self._skipped_reported:
            logger.warning(
                "optimizer step %d: %d decorrelation update(s) skipped by the guard (R non-finite or loss above %g); "
                "R left unchanged",
                self.optimizer_steps,
                skipped - self._skipped_reported,
                self.guard["max_loss"],
            )
            self._skipped_reported = skipped
        return loss

    def skipped_updates(self) -> int:
        """Updates refused by the guard so far, over every R."""
        return sum(d.skipped_updates for d in self.modules())

    def mean_loss(self) -> float | None:
        """The mean decorrelation loss of the steps since the last call (for a log record), or None."""
        losses, self.losses = self.losses, []
        return sum(losses) / len(losses) if losses else None

    def row_samplers(self) -> list[RowSampler]:
        samplers = {id(d.generator): d.generator for d in self.modules() if d.generator is not None}
        return list(samplers.values())

    def state_dict(self) -> dict:
        """What a resumed run needs to go on as an uninterrupted one: the optimizer steps taken, the state of the
        generators that draw the statistics' rows, the decorrelation losses not yet reported by `mean_loss` and the
        guard's count of skipped updates of each R (save it with your checkpoint, or
        `accelerator.register_for_checkpointing(hook)`)."""
        return {
            "optimizer_steps": self.optimizer_steps,
            "row_samplers": [s.get_state() for s in self.row_samplers()],
            "pending_losses": list(self.losses),
            "skipped_updates": [d.skipped_updates for d in self.modules()],
        }

    def load_state_dict(self, state: dict) -> None:
        samplers = self.row_samplers()
        if len(state["row_samplers"]) != len(samplers):
            raise ValueError(
                f"the saved DBP state has {len(state['row_samplers'])} row generators, this model {len(samplers)}: it "
                "was saved from another model"
            )
        for sampler, saved in zip(samplers, state["row_samplers"], strict=True):
            sampler.set_state(saved)
        self.optimizer_steps = int(state["optimizer_steps"])
        # Saved by hf-dbp since 0.2 (a state without them resumes with none pending and the counts from 0).
        self.losses = [float(loss) for loss in state.get("pending_losses", [])]
        skipped = state.get("skipped_updates")
        if skipped is not None and len(skipped) == len(self.modules()):
            for module, count in zip(self.modules(), skipped, strict=True):
                module.skipped_updates = int(count)
            self._skipped_reported = self.skipped_updates()


def attach_decorrelation(optimizer, model: nn.Module, **options) -> DecorrelationHook:
    """Take the decorrelation step of `model`'s R after every real `optimizer.step()`, in any training loop.

    Args:
        optimizer (`torch.optim.Optimizer`):
            The optimizer that trains `model` (or a wrapper of it: Accelerate's, Lightning's), or under DeepSpeed the
            engine's optimizer (`engine.optimizer`; then call `hf_dbp.prepare_for_deepspeed(model)` before
            `deepspeed.initialize`). R is removed from its parameter groups if it holds it.
        model (`nn.Module`):
            The decorrelated model (see [`DecorrelationHook`]).
        options:
            The keyword arguments of [`DecorrelationHook`] (`lr_scheduler`, `lr_schedule`, `update_every`, ...).

    Returns:
        The [`DecorrelationHook`]: `remove()` detaches it; `state_dict()` / `load_state_dict()` save and restore its
        state with your checkpoints; `mean_loss()` gives the decorrelation loss to log.

    Raises:
        ValueError: the model has no R (and no `measure_only`), the optimizer holds none of the model's weights, DBP
            is attached to this optimizer already, or DeepSpeed holds R (see `hf_dbp.prepare_for_deepspeed`).
    """
    return DecorrelationHook(model, **options).attach(optimizer)


__all__ = ["GUARDS", "LR_SCHEDULES", "DecorrelationHook", "attach_decorrelation"]
