"""Model cards for the Hub that carry a run's emissions, settings and results: one builder for every model.

The metadata follows the Hub's model-card specification: `co2_eq_emissions` (emissions in grams, `source`,
`training_type`, `geographical_location`, `hardware_used`), `library_name`, `tags`, `datasets`, `base_model` and a
`model-index` with the evaluation results. The facts of the training (data, steps, time, DBP settings) are also kept
as data, under the metadata key `hf_dbp`, so that a card written from this one (`hf-dbp merge`) reads them back
without parsing text. Figures come from the run's own files (`emissions.csv`, or one `emissions_machine<k>.csv` per
machine, and `all_results.json`) wherever they exist, so the card always says what those files say.

What a card says about one kind of model (its tags, metrics, description and loading code) is a
[`~hf_dbp.models.card_profiles.CardProfile`]; the profiles of hf-dbp's own models come from `hf_dbp.models`, every
other model gets the generic one of its Auto class.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from ..core.config import CONFIG_ATTRIBUTE
from ..models.card_profiles import CardProfile, card_profile
from .emissions import EMISSIONS_CSV, WORLD_AVERAGE, EmissionsReport, combine_reports, machine_csv_paths

FACTS_KEY = "hf_dbp"
"""The card metadata key that holds the training's facts as data: `datasets`, `steps`, `training_seconds`,
`decorrelation` (the settings, also after a merge)."""
_VARIANCE_TERMS = {"rows": "rows, diag(v) R", "columns": "columns, R diag(v) (the reference code's form)"}


def is_repo_id(name: str) -> bool:
    """Whether `name` can be a Hub repo id here: not a path on this machine, and of the Hub's form (`name` or
    `owner/name`, as huggingface_hub's own validator says: no absolute or dotted path, no second `/`)."""
    if os.path.exists(name):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def read_emissions_csv(folder: str) -> EmissionsReport | None:
    """The total of a run in `folder` (grams, not kg): the last row of codecarbon's `emissions.csv`, or for a run on
    several machines the sum of the last rows of their `emissions_machine<k>.csv` (see `hf_dbp.training.emissions`)."""
    machines = [report for report in map(_read_last_row, machine_csv_paths(folder)) if report is not None]
    if machines:
        return combine_reports(machines)
    return _read_last_row(os.path.join(folder, EMISSIONS_CSV))


def _read_last_row(path: str) -> EmissionsReport | None:
    if not os.path.isfile(path):
        return None
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    if not rows:
        return None
    last = rows[-1]
    location = last["country_name"] if last.get("country_iso_code") else WORLD_AVERAGE
    hardware = f"{int(float(last['cpu_count']))} CPU cores ({last['cpu_model']})"
    if float(last.get("gpu_count") or 0):
        hardware += f", {int(float(last['gpu_count']))} x {last['gpu_model']}"
    return EmissionsReport(
        energy_kwh=float(last["energy_consumed"]),
        emissions_g=float(last["emissions"]) * 1000.0,
        duration_s=float(last["duration"]),
        location=location,
        hardware=hardware,
        final=True,
    )


def read_results(folder: str) -> dict:
    path = os.path.join(folder, "all_results.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as file:
        return json.load(file)


def read_card_facts(folder: str) -> dict:
    """The training facts an hf-dbp card in `folder` keeps as data (`datasets`, `steps`, `training_seconds`,
    `decorrelation`), or `{}`."""
    path = os.path.join(folder, "README.md")
    if not os.path.isfile(path):
        return {}
    facts = ModelCard.load(path).data.to_dict().get(FACTS_KEY)
    return dict(facts) if isinstance(facts, Mapping) else {}


def hub_dataset_ids(datasets: list[str] | None) -> list[str]:
    """The entries of `datasets` that are Hub dataset ids (`name` or `owner/name`, not a local path): what the card's
    `datasets:` metadata takes. Local folders and descriptions are named in the card's body only."""
    return [d for d in datasets or [] if is_repo_id(d)]


def decorrelation_of(config) -> dict | None:
    """The DBP settings (a `DecorrelationConfig` dict) of a saved model's config or of one of its sub-configs (a
    backbone's), if they decorrelate any layer; None for a plain model."""
    for candidate in [
        config,
        *(v for v in vars(config).values() if hasattr(v, "to_dict") and hasattr(v, "model_type")),
    ]:
        values = getattr(candidate, CONFIG_ATTRIBUTE, None)
        if isinstance(values, Mapping) and values.get("groups"):
            return dict(values)
    return None


def _settings_rows(settings: dict) -> list[str]:
    groups = settings.get("groups") or {}
    layers = sum(len(paths) for paths in groups.values())
    targets = settings.get("target_modules")
    return [
        "| setting | value |",
        "| --- | --- |",
        f"| decorrelated layers | {layers}, sharing {len(groups)} matrices R |",
        f"| target modules | {targets if targets is not None else 'the defaults of its architecture'} |",
        f"| decorrelation lr | {settings.get('lr')} |",
        f"| kappa | {settings.get('kappa')} |",
        f"| sample fraction | {settings.get('sample_fraction')} |",
        f"| variance term | {_VARIANCE_TERMS.get(settings.get('variance_form'), _VARIANCE_TERMS['rows'])} |",
    ] + (  # a block-diagonal R; the card of a full R, the method as published, keeps the rows above
        [f"| R | block-diagonal, blocks of at most {settings['block_size']} inputs |"]
        if settings.get("block_size")
        else []
    )


def build_model_card(
    config,
    model_name: str,
    results: dict | None = None,
    emissions: EmissionsReport | None = None,
    datasets: list[str] | None = None,
    base_model: str | None = None,
    training_seconds: float | None = None,
    steps: int | None = None,
    merged_from: str | None = None,
    extra_tags: list[str] | None = None,
    load_path: str | None = None,
    trained_with: dict | None = None,
) -> ModelCard:
    """A model card for a checkpoint of hf-dbp: any model decorrelated with hf-dbp, its BP baseline, or a merge.

    Args:
        config: the saved model's config.
        model_name: the name in the model index (e.g. the Hub repo id or the folder name).
        results: metrics as in `all_results.json` (`eval_loss`; `eval_mean_iou`, ...).
        emissions: the run's energy and CO2; omitted from the metadata when unknown.
        datasets: the training data sets (Hub ids or descriptions).
        base_model: the checkpoint this one was fine-tuned (or merged) from.
        training_seconds, steps: training time and optimizer steps.
        merged_from: for `hf-dbp merge` output: the checkpoint whose R were folded in.
        extra_tags: more tags.
        load_path: what the card's loading code passes to `from_pretrained`: the Hub repo id once pushed, the
            folder's absolute path locally (default: `model_name`).
        trained_with: for `hf-dbp merge` output: the DBP settings (a `DecorrelationConfig` dict) it was trained with.
    """
    results = results or {}
    load_path = load_path or model_name
    profile: CardProfile = card_profile(config)
    settings = decorrelation_of(config)
    dbp = settings is not None
    tags = ["hf-dbp", *profile.tags] + (["dbp", "decorrelated-backpropagation"] if dbp or merged_from else [])
    tags += [tag for tag in dict.fromkeys(extra_tags or []) if tag not in tags]
    dataset_name = (datasets or ["unspecified"])[0]
    eval_results = [
        EvalResult(
            task_type=profile.task_type or "other",
            task_name=profile.task_name,
            dataset_type=dataset_name,
            dataset_name=dataset_name,
            dataset_split="validation",
            metric_type=key.removeprefix("eval_"),
            metric_name=label,
            metric_value=float(results[key]),
        )
        for key, label in profile.metrics.items()
        if key in results
    ]
    co2 = None
    if emissions is not None:
        co2 = {
            "emissions": emissions.emissions_g,
            "source": "codecarbon",
            "training_type": "fine-tuning" if base_model or profile.fine_tuning else "pre-training",
            "geographical_location": emissions.location,
            "hardware_used": emissions.hardware,
        }
    facts = {
        "datasets": datasets,
        "steps": steps,
        "training_seconds": training_seconds,
        "decorrelation": settings or trained_with,
    }
    data = ModelCardData(
        library_name="transformers",
        tags=tags,
        datasets=hub_dataset_ids(datasets) or None,
        # The metadata's base_model is a Hub id; a local folder is named in the body only.
        base_model=base_model if base_model and not os.path.exists(base_model) else None,
        model_name=model_name,
        eval_results=eval_results or None,
        co2_eq_emissions=co2,
        pipeline_tag=profile.pipeline_tag,
        **{FACTS_KEY: {k: v for k, v in facts.items() if v is not None}},
    )
    method = "decorrelated backpropagation (DBP)" if dbp else "plain backpropagation (the BP baseline)"
    lines = [f"# {model_name}", "", profile.describe(config, method, merged_from), "", "## Decorrelation", ""]
    if dbp:
        lines += [
            "Each decorrelated layer computes y = W (R x) + b; R is updated after every optimizer step to "
            "decorrelate the layer's inputs. Layers that read the same input share one R.",
            "",
        ]
        lines += _settings_rows(settings)
    elif merged_from and trained_with:
        lines += [
            "Trained with these DBP settings; every R is now folded into its layer's weight (W R), so the model "
            "computes the same outputs with plain layers.",
            "",
        ]
        lines += _settings_rows(trained_with)
    elif merged_from or profile.fine_tuning:
        lines.append("The model holds no R: any decorrelation from pre-training is folded into its weights.")
    else:
        lines.append("None: this is the plain BP baseline (or a model with its R folded in).")
    lines += ["", "## Training", "", "| | |", "| --- | --- |"]
    lines += [f"| data | {', '.join(datasets)} |"] if datasets else []
    lines += [f"| started from | {base_model} |"] if base_model else []
    lines += [f"| optimizer steps | {steps} |"] if steps is not None else []
    if training_seconds is not None:
        lines.append(f"| training time | {training_seconds:.1f} s ({training_seconds / 3600:.2f} h) |")
    if emissions is not None:
        lines += [
            f"| energy | {emissions.energy_kwh:.6g} kWh |",
            f"| emissions | {emissions.emissions_g:.6g} g CO2-eq (codecarbon) |",
            f"| location | {emissions.location} |",
            f"| hardware | {emissions.hardware} |",
        ]
    shown = [(label, results[key]) for key, label in profile.metrics.items() if key in results]
    if shown:
        lines += ["", "## Results", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {label} | {value:.4f} |" for label, value in shown]
    lines += ["", "## How to load", "", *profile.loading(config, load_path, dbp), ""]
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + "\n".join(lines))


def write_model_card(folder: str, config, **kwargs) -> str:
    """Write `README.md` into `folder`; `results` and `emissions` default to the folder's own files."""
    if kwargs.get("results") is None:
        kwargs["results"] = read_results(folder)
    if kwargs.get("emissions") is None:
        kwargs["emissions"] = read_emissions_csv(folder)
    kwargs.setdefault("model_name", os.path.basename(os.path.abspath(folder)))
    # The loading code must work where the card is read: a Hub repo id given as the name (the card of a push), else
    # this folder's absolute path (a relative one fails from anywhere but the directory the run started in).
    name = kwargs["model_name"]
    kwargs.setdefault("load_path", name if "/" in name and is_repo_id(name) else os.path.abspath(folder))
    card = build_model_card(config, **kwargs)
    path = os.path.join(folder, "README.md")
    card.save(path)
    return path


__all__ = [
    "FACTS_KEY",
    "build_model_card",
    "decorrelation_of",
    "hub_dataset_ids",
    "is_repo_id",
    "read_card_facts",
    "read_emissions_csv",
    "read_results",
    "write_model_card",
]
