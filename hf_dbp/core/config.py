"""`DecorrelationConfig`: what to decorrelate in a model, and how (the DBP counterpart of a PEFT config)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

VARIANCE_FORMS = ("rows", "columns")
"""Where the update puts the variance term `kappa * v`: `"rows"`, `diag(v) R` (the method's rule, which
normalises the variance of each output `z_i`), or `"columns"`, `R diag(v)` (what the reference code
artcogsys/decorbp computes with `v * R`, for reproducing it exactly)."""

CONFIG_ATTRIBUTE = "decorrelation"
"""The attribute of a transformers config (and key of its `config.json`) that holds a decorrelated model's
[`DecorrelationConfig`], so that every `save_pretrained`, checkpoint and `push_to_hub` carries it."""

ALL_LINEAR = "all-linear"

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "fast": {"block_size": 384},
}
"""Named settings of [`DecorrelationConfig`] (`DecorrelationConfig.preset(name)`, `--decorrelation_preset` of the
example scripts): `"paper"`, the method as published (full R), the default; `"fast"`, block-diagonal R with blocks
of 384 inputs (ViT-B/16: two blocks per 768-wide input, eight for fc2's 3072), which took ViT-B/16's step on 2 CPU
cores at 64 images from 1.11 to 1.05 times BP's and, at the demo size with as many blocks per layer, kept at least
80% of full DBP's steps saved in every seed and set measured (benchmarks/README.md, "A cheaper DBP", has the
measurements that chose it)."""


def check_step_settings(lr: float, kappa: float, sample_fraction: float, variance_form: str, prefix: str = "") -> None:
    """Raise a `ValueError` naming (as `prefix` + name) the first of the step's settings whose value cannot work."""

    def is_number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    if not (is_number(lr) and lr >= 0):
        raise ValueError(f"{prefix}lr must be a number >= 0, got {lr!r}")
    if not (is_number(kappa) and 0.0 <= kappa <= 1.0):
        raise ValueError(f"{prefix}kappa must be a number in [0, 1], got {kappa!r}")
    if not (is_number(sample_fraction) and 0.0 < sample_fraction <= 1.0):
        raise ValueError(f"{prefix}sample_fraction must be a number in (0, 1], got {sample_fraction!r}")
    if variance_form not in VARIANCE_FORMS:
        raise ValueError(f"{prefix}variance_form must be one of {list(VARIANCE_FORMS)}, got {variance_form!r}")


def check_block_size(block_size: int | None, prefix: str = "") -> None:
    """Raise a `ValueError` naming (as `prefix` + `block_size`) a block size that is neither None nor an integer
    >= 1."""
    integer = isinstance(block_size, int) and not isinstance(block_size, bool)
    if block_size is not None and not (integer and block_size >= 1):
        raise ValueError(f"{prefix}block_size must be an integer >= 1 or None, got {block_size!r}")


@dataclass
class DecorrelationConfig:
    """Which layers of a model to decorrelate and the settings of their decorrelation step.

    Args:
        lr (`float`, defaults to 1e-3): step size of the update of every R, taken after each optimizer step. `0.0`
            keeps R fixed.
        kappa (`float`, defaults to 1e-2): balance between decorrelation (`0.0`) and variance normalisation (`1.0`);
            in between R whitens its inputs.
        sample_fraction (`float`, defaults to 0.1): fraction of the rows (tokens) of each training forward used for
            R's statistics, in (0, 1]. The forward decorrelates every row regardless.
        target_modules (`list[str]` or `str`, *optional*): the layers to decorrelate, as in PEFT: a list of names, each
            matching a module whose dotted name equals it or ends with `.<name>`; a string, matched as a regular
            expression against the whole name; or `"all-linear"`, every `nn.Linear` and transformers `Conv1D` except
            the output layer (LM head) and, in an encoder-decoder model, the decoder. `None` (default): the defaults
            for the model's architecture (`hf_dbp.target_modules.TARGET_MODULES`), an error for an architecture without them.
            Only `nn.Linear`, transformers' `Conv1D` and patchifying `nn.Conv2d` can be decorrelated.
        exclude_modules (`list[str]` or `str`, *optional*): layers never to decorrelate, in the same forms. `None`
            (default): the architecture's default exclusions (e.g. ViTMAE's and Whisper's decoders), if any.
        variance_form (`str`, defaults to `"rows"`): `"rows"` (`diag(v) R`, the method's rule) or `"columns"`
            (`R diag(v)`, what the reference code computes); see `VARIANCE_FORMS`.
        block_size (`int`, *optional*): make every R block-diagonal, with blocks of at most `block_size` inputs (the
            largest divisor of the layer's input width not above it). Its fold, statistics, update and memory cost
            `b / d` of a full R's (for ViT-B/16's fc2, `b = 384`: an eighth), and it decorrelates only within each
            block. `None` (default): full R, the method as published. See `DecorrelationConfig.fast()`.
        seed (`int`, defaults to 0): seed of the generator that draws the rows for the statistics. It is separate from
            torch's global RNG, so a DBP run and a BP run with one seed draw the same dropout and masks.
        groups (`dict[str, list[str]]`, *optional*): the resolved plan, filled in by `hf_dbp.decorrelate`: for each R,
            its name and the layers that read their input through it (layers that read the same input share one R).
            Saved with the model, so that loading rebuilds exactly the same R without tracing the model again.
    """

    lr: float = 1e-3
    kappa: float = 1e-2
    sample_fraction: float = 0.1
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    variance_form: str = "rows"
    block_size: int | None = None
    seed: int = 0
    groups: dict[str, list[str]] | None = field(default=None)

    def __post_init__(self) -> None:
        check_step_settings(self.lr, self.kappa, self.sample_fraction, self.variance_form, "DecorrelationConfig.")
        check_block_size(self.block_size, "DecorrelationConfig.")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple, set)):
                if not all(isinstance(v, str) and v for v in value):
                    raise ValueError(
                        f"DecorrelationConfig.{name} must hold module names (non-empty strings), got {value!r}"
                    )
                setattr(self, name, list(value))
            elif isinstance(value, str):
                if value != ALL_LINEAR:
                    try:
                        re.compile(value)
                    except re.error as error:
                        raise ValueError(
                            f"DecorrelationConfig.{name} {value!r} is not a valid regular expression: {error}"
                        ) from None
            elif value is not None:
                raise ValueError(
                    f"DecorrelationConfig.{name} must be a list of names, a regular expression or "
                    f"'{ALL_LINEAR}', got {type(value).__name__}"
                )
        if self.exclude_modules == ALL_LINEAR:
            raise ValueError(f"DecorrelationConfig.exclude_modules cannot be '{ALL_LINEAR}'")
        if self.groups is not None:
            if not isinstance(self.groups, dict) or not all(
                isinstance(k, str) and isinstance(v, (list, tuple)) and v for k, v in self.groups.items()
            ):
                raise ValueError(
                    "DecorrelationConfig.groups must map each R's name to a non-empty list of layer names"
                )
            self.groups = {k: list(v) for k, v in self.groups.items()}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DecorrelationConfig:
        """The config from `to_dict`'s output; unknown keys are an error that names them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown DecorrelationConfig fields {unknown}; known: {sorted(known)}")
        return cls(**values)

    def replace(self, **changes) -> DecorrelationConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **fields) -> DecorrelationConfig:
        """The config of the named preset of [`PRESETS`], with `fields` set on top of it."""
        if name not in PRESETS:
            raise ValueError(f"unknown decorrelation preset {name!r}; choose one of {list(PRESETS)}")
        return cls(**{**PRESETS[name], **fields})

    @classmethod
    def fast(cls, **fields) -> DecorrelationConfig:
        """`DecorrelationConfig.preset("fast", **fields)`: block-diagonal R (see [`PRESETS`])."""
        return cls.preset("fast", **fields)


__all__ = ["ALL_LINEAR", "CONFIG_ATTRIBUTE", "PRESETS", "VARIANCE_FORMS", "DecorrelationConfig"]
