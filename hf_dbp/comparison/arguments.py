"""Every flag of the comparison scripts and its default, in one place: `ComparisonArguments` (BP-MAE against DBP-MAE,
`examples/compare_bp_dbp.py`), `ClmComparisonArguments` (causal language modelling, `examples/compare_bp_dbp_clm.py`)
and `SweepArguments` (the settings sweep, `examples/sweep_bp_dbp.py`: the MAE comparison's arguments from the untuned
settings it varies). A default chosen by a sweep says so in its help.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..tasks.image_data import DEMO_MODEL, DEMO_SETS
from ..tasks.scripts import DecorrelationPresetArguments
from ..tasks.text_data import DEMO_MODEL as CLM_DEMO_MODEL
from ..tasks.text_data import TEXT_SETS
from ..training.optimizers import MATRIX_OPTIMIZERS
from ..training.training_args import DECORRELATION_LR_SCHEDULES
from .methods import OPTIMIZERS


@dataclass
class ComparisonArguments(DecorrelationPresetArguments):
    output_dir: str = field(
        default="outputs/compare-bp-dbp", metadata={"help": "Where both runs and the comparison go."}
    )
    train_dir: str | None = field(
        default=None, metadata={"help": "Folder of training images (default: the embedded demo set)."}
    )
    validation_dir: str | None = field(default=None, metadata={"help": "Folder of validation images."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "A datasets name or local folder instead of the image folders."}
    )
    image_column_name: str | None = field(default=None, metadata={"help": "Image column of --dataset_name."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep this many training images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep this many validation images."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "One BP and one DBP run per seed."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Start both from this checkpoint (default: from scratch)."}
    )
    config_overrides: str = field(default=DEMO_MODEL, metadata={"help": "The model trained from scratch."})
    num_train_epochs: float = field(default=8, metadata={"help": "Budget in epochs..."})
    max_steps: int = field(default=-1, metadata={"help": "...or in optimizer steps..."})
    max_train_minutes: float | None = field(default=None, metadata={"help": "...or in minutes of training, each run."})
    eval_steps: int = field(
        default=8,
        metadata={
            "help": "Evaluate every this many optimizer steps (often, so that the step resolution does not decide "
            "the figures)."
        },
    )
    per_device_train_batch_size: int = field(default=64)
    base_learning_rate: float = field(default=1.5e-3, metadata={"help": "MAE lr = base x batch / 256, for DBP..."})
    bp_base_learning_rate: float | None = field(
        default=3e-3,
        metadata={
            "help": "...and for BP, tuned separately (3e-3: the best of examples/sweep_bp_dbp.py on the default set; "
            "empty: the same as DBP)."
        },
    )
    learning_rate_sweep: list[float] | None = field(
        default=None,
        metadata={
            "help": "Base learning rates to try for both BP and DBP (replaces the two above): each method is "
            "compared at its best one, the lowest mean best eval loss over the seeds."
        },
    )
    demo_photos: str = field(
        default="default",
        metadata={
            "help": "Without data of yours: the embedded 'default' photographs, the 'alternate' set, or a held-out "
            "set: 'heldout_photos', 'heldout_faces', 'heldout_terrain'.",
            "choices": list(DEMO_SETS),
        },
    )
    warmup_steps: float = field(default=20)
    decorrelation_lr: float = field(
        default=3e-3,
        metadata={
            "help": "R's learning rate (3e-3 with the tied schedule: the best of examples/sweep_bp_dbp.py on the "
            "default set)."
        },
    )
    decorrelation_kappa: float = field(default=1e-2)
    decorrelation_sample_fraction: float = field(default=0.1)
    decorrelation_layers: list[str] = field(
        default_factory=lambda: ["patch_embeddings", "qkv", "o_proj", "fc1", "fc2"]
    )
    decorrelation_variance_form: str = field(
        default="rows", metadata={"help": "'rows' (diag(v) R) or 'columns' (R diag(v), the reference code)."}
    )
    decorrelation_lr_schedule: str = field(
        default="tied",
        metadata={
            "help": "'constant', or 'tied' to the weights' warm-up and cosine decay.",
            "choices": list(DECORRELATION_LR_SCHEDULES),
        },
    )
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW's (and every peer's) weight decay, for DBP..."})
    bp_weight_decay: float | None = field(
        default=None, metadata={"help": "...and for BP if tuned separately (default: the same)."}
    )
    optimizers: list[str] = field(
        default_factory=lambda: ["adamw"],
        metadata={
            "help": "Run BP and DBP with each: 'adamw', 'muon' (torch.optim.Muon on the hidden matrices, AdamW on "
            "the rest), 'soap' (pytorch-optimizer's SOAP on them), 'schedulefree' (transformers' "
            "schedule_free_adamw). Records: bp, dbp, bp_muon, dbp_muon, ...",
            "choices": list(OPTIMIZERS),
        },
    )
    optimizer_base_learning_rates: list[str] = field(
        default_factory=lambda: ["muon=1.5e-3", "soap=3e-3", "schedulefree=3e-3"],
        metadata={
            "help": "optimizer=rate each (e.g. 'soap=3e-3'): the base learning rate of BP and DBP with that peer, "
            "where its own tuning chose another than --base_learning_rate."
        },
    )
    muon_lr_multiplier: float = field(
        default=4.0, metadata={"help": "Muon's learning rate over AdamW's (its updates are scaled to AdamW's RMS)."}
    )
    emissions_country: str | None = field(default=None, metadata={"help": "ISO alpha-3 country for the CO2 figures."})
    decorrelation_update_every: list[int] = field(
        default_factory=lambda: [1],
        metadata={
            "help": "Also run DBP (AdamW) with R updated every k optimizer steps, for each k > 1 here: records "
            "dbp_every<k>, compared against bp (a k-th of DBP's traffic between processes; what it costs in "
            "convergence)."
        },
    )
    finetune_data_dir: str | None = field(
        default=None, metadata={"help": "ADE20K-layout folder: fine-tune both with UperNet."}
    )
    finetune_dataset_name: str | None = field(default=None, metadata={"help": "Or a Hub/parquet dataset for it."})
    finetune_args: str = field(
        default="", metadata={"help": "More flags for run_segmentation.py, e.g. '--max_steps 2000'."}
    )

    def __post_init__(self) -> None:
        self.peer_rates()  # checked before anything runs
        if any(not (isinstance(k, int) and k >= 1) for k in self.decorrelation_update_every):
            raise ValueError(
                f"--decorrelation_update_every takes integers >= 1, got {self.decorrelation_update_every}"
            )

    def peer_rates(self) -> dict[str, float]:
        """`--optimizer_base_learning_rates` as {peer: base learning rate}."""
        return parse_peer_rates(self.optimizer_base_learning_rates, OPTIMIZERS[1:], "--optimizer_base_learning_rates")


def parse_peer_rates(items: list[str], peers: tuple[str, ...], flag: str) -> dict[str, float]:
    """`["muon=1.5e-3", ...]` as {peer: rate}; a `ValueError` naming `flag` for an unknown peer or a rate not > 0."""
    rates = {}
    for item in items:
        name, _, rate = item.partition("=")
        try:
            rates[name] = float(rate)
        except ValueError:
            rates[name] = None
        if name not in peers or rates[name] is None or not rates[name] > 0:
            raise ValueError(f"{flag} takes peer=rate with a peer of {list(peers)} and a rate > 0, got {item!r}")
    return rates


@dataclass
class ClmComparisonArguments(DecorrelationPresetArguments):
    output_dir: str = field(
        default="outputs/compare-bp-dbp-clm", metadata={"help": "Where the runs and the comparison go."}
    )
    demo_text: str = field(
        default="default",
        metadata={
            "help": "Without files of yours: the embedded text set ('default', tuned on; 'heldout_plays', "
            "'heldout_python_docs': held out).",
            "choices": list(TEXT_SETS),
        },
    )
    train_file: str | None = field(default=None, metadata={"help": "A text file of yours instead."})
    validation_file: str | None = field(default=None, metadata={"help": "Its validation file."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "One BP and one DBP run per seed."})
    model_type: str = field(default="llama", metadata={"help": "The architecture trained from scratch."})
    config_overrides: str = field(default=CLM_DEMO_MODEL, metadata={"help": "Its size."})
    block_size: int = field(default=128)
    tokenizer_vocab_size: int = field(default=2048)
    max_steps: int = field(default=200, metadata={"help": "The budget in optimizer steps."})
    eval_steps: int = field(default=20, metadata={"help": "Evaluate every this many steps."})
    max_eval_samples: int = field(default=64, metadata={"help": "Validation blocks (the same for every run)."})
    per_device_train_batch_size: int = field(default=16)
    learning_rate: float = field(
        default=8e-3,
        metadata={
            "help": "The weights' peak learning rate, for DBP (8e-3: its best of 1e-3, 2e-3, 4e-3, 8e-3 on the "
            "default text, seed 0)..."
        },
    )
    bp_learning_rate: float | None = field(
        default=4e-3,
        metadata={"help": "...and for BP, tuned alike (4e-3: its best of the same four; empty: the same as DBP)."},
    )
    learning_rate_sweep: list[float] | None = field(
        default=None,
        metadata={
            "help": "Learning rates to try for both (replaces the two above): each method is compared at its own "
            "best, the lowest mean best eval loss over the seeds."
        },
    )
    warmup_steps: int = field(default=30)
    weight_decay: float = field(default=0.1)
    decorrelation_lr: float = field(default=1e-3, metadata={"help": "R's learning rate."})
    decorrelation_kappa: float = field(default=1e-2)
    decorrelation_sample_fraction: float = field(default=0.1)
    decorrelation_lr_schedule: str = field(
        default="tied",
        metadata={
            "help": "'constant', or 'tied' to the weights' warm-up and decay.",
            "choices": list(DECORRELATION_LR_SCHEDULES),
        },
    )
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "Layers to decorrelate (default: the architecture's)."}
    )
    optimizers: list[str] = field(
        default_factory=lambda: ["adamw"],
        metadata={
            "help": "Run BP and DBP with each: 'adamw', 'muon' (torch.optim.Muon on the hidden matrices, AdamW on "
            "the rest), 'soap'. Records: bp, dbp, bp_muon, dbp_muon, ...",
            "choices": list(MATRIX_OPTIMIZERS),
        },
    )
    optimizer_learning_rates: list[str] = field(
        default_factory=list,
        metadata={
            "help": "optimizer=rate each (e.g. 'muon=2e-3'): the peak learning rate of BP and DBP with that peer, "
            "where its own tuning chose another than --learning_rate; or method=rate ('bp_muon=8e-3', "
            "'dbp_muon=4e-3') for one of them (default: BP's and DBP's own rates)."
        },
    )
    muon_lr_multiplier: float = field(
        default=4.0, metadata={"help": "Muon's learning rate over AdamW's (its updates are scaled to AdamW's RMS)."}
    )

    def __post_init__(self) -> None:
        self.peer_rates()  # checked before anything runs

    def peer_rates(self) -> dict[str, float]:
        """`--optimizer_learning_rates` as {peer or method: learning rate}."""
        peers = MATRIX_OPTIMIZERS[1:]
        names = (*peers, *(f"{kind}_{peer}" for peer in peers for kind in ("bp", "dbp")))
        return parse_peer_rates(self.optimizer_learning_rates, names, "--optimizer_learning_rates")


@dataclasses.dataclass
class SweepArguments(ComparisonArguments):
    """`compare_bp_dbp.py`'s arguments, starting from the untuned settings the sweep varies (the reference code's
    decorrelation lr 1e-3, constant; BP at DBP's base rate; the peers at it too): the comparison's defaults are what
    this sweep chose."""

    output_dir: str = dataclasses.field(
        default="outputs/sweep-bp-dbp", metadata={"help": "Where the runs and the sweep go."}
    )
    seeds: list[int] = dataclasses.field(
        default_factory=lambda: [0, 1], metadata={"help": "One run per variant and seed."}
    )
    bp_base_learning_rate: float | None = None
    decorrelation_lr: float = 1e-3
    decorrelation_lr_schedule: str = "constant"
    optimizer_base_learning_rates: list[str] = dataclasses.field(default_factory=list)
    variants: list[str] | None = dataclasses.field(
        default=None,
        metadata={"help": "method[:name=value,...] each; at least one BP variant (the baseline is the best of them)."},
    )
    variant_set: str = dataclasses.field(
        default="bp_dbp",
        metadata={
            "help": "Without --variants: 'bp_dbp' (BP's and DBP's settings) or 'peers' (the peers' learning rates).",
            "choices": ["bp_dbp", "peers"],
        },
    )
    reuse_runs: bool = dataclasses.field(
        default=False,
        metadata={
            "help": "Reuse a finished run in the output folder whose command was exactly the same "
            "(a sweep stopped half-way, or grown by new variants, goes on from what it has)."
        },
    )
