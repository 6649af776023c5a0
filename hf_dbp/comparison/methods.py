"""The names of a comparison's records: `bp` and `dbp` (AdamW), `bp_<optimizer>` and `dbp_<optimizer>` with a peer
optimizer, `dbp_every<k>` for DBP with R updated every k optimizer steps; and which BP each DBP is compared with."""

from __future__ import annotations

from ..training.optimizers import MATRIX_OPTIMIZERS

OPTIMIZERS = (*MATRIX_OPTIMIZERS, "schedulefree")
"""`--optimizers`: the matrix optimizers of `hf_dbp.training.optimizers`, and transformers' schedule-free AdamW
(`--optim schedule_free_adamw`, its own warm-up, a constant schedule)."""


def update_every_of(method: str) -> int:
    """k of a `dbp_every<k>` record (R updated every k optimizer steps), 1 for every other method."""
    return int(method[len("dbp_every") :]) if method.startswith("dbp_every") else 1


def baseline_of(dbp: str) -> str:
    """The BP record a DBP record is compared against: the BP run with its optimizer (bp for dbp_every<k>)."""
    return "bp" if update_every_of(dbp) > 1 else "bp" + dbp[len("dbp") :]


def method_names(optimizer: str) -> tuple[str, str]:
    """The records of BP and DBP with `optimizer`: bp and dbp with AdamW, bp_<optimizer> and dbp_<optimizer> else."""
    return ("bp", "dbp") if optimizer == "adamw" else (f"bp_{optimizer}", f"dbp_{optimizer}")


def optimizer_pairs(optimizers: list[str]) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """A comparison's `--optimizers` as its (BP, DBP) record pairs, one per optimizer in order, and each record's
    optimizer."""
    optimizers = list(dict.fromkeys(optimizers))
    optimizer_of = {method: optimizer for optimizer in optimizers for method in method_names(optimizer)}
    return [method_names(optimizer) for optimizer in optimizers], optimizer_of
