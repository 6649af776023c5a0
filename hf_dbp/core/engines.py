"""Keeping R whole and out of every optimizer under sharded training engines: FSDP (1 and 2) and DeepSpeed ZeRO.

R must never be sharded, partitioned or averaged: each process updates its own whole copy after every optimizer step
from statistics combined over all processes ([`hf_dbp.core.step`]), so that the copies stay identical. DDP needs
nothing (R is neither a gradient parameter nor a buffer); the sharding engines are told to leave R alone:

- FSDP2 (`torch.distributed.fsdp.fully_shard`): `fully_shard(module, ignored_params=fsdp_ignored_params(model))`;
  FSDP1: `ignored_states=fsdp_ignored_params(model)` (or `ignored_modules`); Accelerate, both versions:
  `fsdp_ignored_modules: FSDP_IGNORED_MODULES` in its config file.
- DeepSpeed ZeRO has no way to leave a parameter out of its partitioning (ZeRO-3 partitions frozen parameters too)
  and flattens whatever the optimizer holds into its own buffers (every stage). [`prepare_for_deepspeed`] turns every
  R into a buffer under the same state-dict key: DeepSpeed neither partitions nor optimises buffers. An R built
  inside ZeRO-3's `zero.Init` is a buffer from the start (`Decorrelation.__init__`).

docs/engines.md says what to configure for each engine and what was tested.
"""

from __future__ import annotations

from torch import nn

from .decorrelation import Decorrelation

FSDP_IGNORED_MODULES = r".*_decorrelation"
"""The regular expression (matched against whole module names) that names every module holding an R: Accelerate's
`fsdp_ignored_modules` for FSDP1 and FSDP2."""


def fsdp_ignored_params(model: nn.Module) -> set[nn.Parameter]:
    """Every R of `model`: the parameters FSDP must leave unsharded (`fully_shard(..., ignored_params=...)`)."""
    return {m.R for m in model.modules() if isinstance(m, Decorrelation) and isinstance(m.R, nn.Parameter)}


def _gathered_value(R):
    """R's whole value, also where DeepSpeed's `zero.Init` partitioned it on construction (every process calls this
    together then)."""
    if not hasattr(R, "ds_id"):
        return R.detach()
    import deepspeed

    with deepspeed.zero.GatheredParameters([R]):
        return R.detach().clone()


def prepare_for_deepspeed(model: nn.Module) -> nn.Module:
    """Make every R of `model` a buffer, so that DeepSpeed leaves it whole on every process and out of its optimizer.

    Call it before `deepspeed.initialize` (`DBPTrainer` and [`~hf_dbp.DecorrelationCallback`] do, when the Trainer
    runs DeepSpeed). The state-dict key stays `..._decorrelation.R` (a persistent buffer), so checkpoints, `save_pretrained`
    and [`~hf_dbp.load_decorrelated`] are unchanged; a model built under ZeRO-3's `zero.Init` (transformers'
    `from_pretrained` with a ZeRO-3 config) gets its partitioned R gathered back first. Returns `model`.
    """
    for module in model.modules():
        if isinstance(module, Decorrelation) and "R" in module._parameters:
            value = _gathered_value(module._parameters.pop("R"))
            module.register_buffer("R", value.detach().clone(), persistent=True)
    return model


__all__ = ["FSDP_IGNORED_MODULES", "fsdp_ignored_params", "prepare_for_deepspeed"]
