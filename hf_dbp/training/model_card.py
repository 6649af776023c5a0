"""Model cards for the Hub that carry a run's emissions, settings and results.

The metadata follows the Hub's model-card specification: `co2_eq_emissions` (emissions in grams, `source`,
`training_type`, `geographical_location`, `hardware_used`), `library_name`, `tags`, `datasets`, `base_model` and a
`model-index` with the evaluation results. Figures come from the run's own files (`emissions.csv`, or one
`emissions_machine<k>.csv` per machine, and `all_results.json`) wherever they exist, so the card always says what
those files say.
"""

from __future__ import annotations

import csv
import json
import os
import re

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..models.vit_mae_dbp.configuration_vit_mae_dbp import DBP_CONFIG_FIELDS
from .emissions import EMISSIONS_CSV, WORLD_AVERAGE, EmissionsReport, combine_reports, machine_csv_paths
from .hub import is_repo_id

PRETRAINING_METRICS = {"eval_loss": "MAE reconstruction loss (validation)"}
SEGMENTATION_METRICS = {
    "eval_mean_iou": "mean IoU",
    "eval_mean_accuracy": "mean accuracy",
    "eval_overall_accuracy": "overall accuracy",
}


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
        energy_kwh=float(last["energy_consumed"]), emissions_g=float(last["emissions"]) * 1000.0,
        duration_s=float(last["duration"]), location=location, hardware=hardware, final=True,
    )  # fmt: skip


def read_results(folder: str) -> dict:
    path = os.path.join(folder, "all_results.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as file:
        return json.load(file)


def _is_segmentation(config) -> bool:
    return getattr(config, "model_type", None) == "upernet"


def _is_vit_mae(config) -> bool:
    return _is_segmentation(config) or getattr(config, "model_type", None) in ("vit_mae", "vit_mae_dbp")


# The Auto class that loads an architecture, from transformers' own name lists, and the pipeline task it serves.
_AUTO_CLASSES = (("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM", "text-generation"),
                 ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM", "fill-mask"),
                 ("MODEL_FOR_CTC_MAPPING_NAMES", "AutoModelForCTC", "automatic-speech-recognition"),
                 ("MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "AutoModelForSpeechSeq2Seq", "automatic-speech-recognition"),
                 ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForImageClassification", "image-classification"),
                 ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForSequenceClassification", "text-classification"),
                 ("MODEL_FOR_PRETRAINING_MAPPING_NAMES", "AutoModelForPreTraining", None))  # fmt: skip
LANGUAGE_MODELLING_METRICS = {"eval_loss": "cross-entropy loss (validation)", "perplexity": "perplexity (validation)"}


def _auto_class(config) -> tuple[str, str | None]:
    from transformers.models.auto import modeling_auto

    architecture = (getattr(config, "architectures", None) or [""])[0]
    for names, auto, task in _AUTO_CLASSES:
        classes = getattr(modeling_auto, names, {}).get(config.model_type)
        if architecture and architecture in ((classes,) if isinstance(classes, str) else tuple(classes or ())):
            return auto, task
    return "AutoModel", None


def hub_dataset_ids(datasets: list[str] | None) -> list[str]:
    """The entries of `datasets` that are Hub dataset ids (`name` or `owner/name`, not a local path): what the card's
    `datasets:` metadata takes. Local folders and descriptions are named in the card's body only."""
    return [d for d in datasets or [] if is_repo_id(d)]


def _generic_card(config, model_name, results, emissions, datasets, base_model, seconds, steps, extra_tags,
                  load_path) -> ModelCard:  # fmt: skip
    """The card of a model of any family decorrelated with `hf_dbp.decorrelate` (or its plain BP baseline)."""
    dbp = getattr(config, "decorrelation", None)
    auto, task = _auto_class(config)
    architecture = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    tags = ["hf-dbp", config.model_type] + (["dbp", "decorrelated-backpropagation"] if dbp else []) + ([task] if task else [])
    tags += [tag for tag in dict.fromkeys(extra_tags or []) if tag not in tags]
    dataset_name = (datasets or ["unspecified"])[0]
    eval_results = [
        EvalResult(task_type=task or "other", dataset_type=dataset_name, dataset_name=dataset_name,
                   dataset_split="validation", metric_type=key.removeprefix("eval_"), metric_name=label,
                   metric_value=float(results[key]))  # fmt: skip
        for key, label in LANGUAGE_MODELLING_METRICS.items()
        if key in results
    ]
    co2 = None
    if emissions is not None:
        co2 = {"emissions": emissions.emissions_g, "source": "codecarbon",
               "training_type": "fine-tuning" if base_model else "pre-training",
               "geographical_location": emissions.location, "hardware_used": emissions.hardware}  # fmt: skip
    data = ModelCardData(
        library_name="transformers", tags=tags, datasets=hub_dataset_ids(datasets) or None,
        base_model=base_model if base_model and not os.path.exists(base_model) else None, model_name=model_name,
        eval_results=eval_results or None, co2_eq_emissions=co2, pipeline_tag=task,
    )  # fmt: skip
    method = "decorrelated backpropagation (DBP)" if dbp else "plain backpropagation (the BP baseline)"
    lines = [f"# {model_name}", "", f"A {config.model_type} model (`{architecture}`) trained with {method} using "
             "[hf-dbp](https://github.com/hf-dbp/hf-dbp).", "", "## Decorrelation", ""]  # fmt: skip
    if dbp:
        groups = dbp.get("groups") or {}
        layers = sum(len(paths) for paths in groups.values())
        lines += ["Each decorrelated layer computes y = W (R x) + b; R is updated after every optimizer step to "
                  "decorrelate the layer's inputs. Layers that read the same input share one R.", "",
                  "| setting | value |", "| --- | --- |",
                  f"| decorrelated layers | {layers}, sharing {len(groups)} matrices R |",
                  f"| target modules | {dbp.get('target_modules') or f'defaults for {config.model_type}'} |",
                  f"| decorrelation lr | {dbp.get('lr')} |", f"| kappa | {dbp.get('kappa')} |",
                  f"| sample fraction | {dbp.get('sample_fraction')} |",
                  f"| variance term | {_VARIANCE_TERMS.get(dbp.get('variance_form'), 'rows, diag(v) R')} |"]  # fmt: skip
    else:
        lines.append("None: this is the plain BP baseline (or a model with its R folded in).")
    lines += ["", "## Training", "", "| | |", "| --- | --- |"]
    lines += [f"| data | {', '.join(datasets)} |"] if datasets else []
    lines += [f"| started from | {base_model} |"] if base_model else []
    lines += [f"| optimizer steps | {steps} |"] if steps is not None else []
    lines += [f"| training time | {seconds:.1f} s ({seconds / 3600:.2f} h) |"] if seconds is not None else []
    if emissions is not None:
        lines += [f"| energy | {emissions.energy_kwh:.6g} kWh |",
                  f"| emissions | {emissions.emissions_g:.6g} g CO2-eq (codecarbon) |",
                  f"| location | {emissions.location} |", f"| hardware | {emissions.hardware} |"]  # fmt: skip
    shown = [(label, results[key]) for key, label in LANGUAGE_MODELLING_METRICS.items() if key in results]
    if shown:
        lines += ["", "## Results", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {label} | {value:.4f} |" for label, value in shown]
    lines += ["", "## How to load", "", "```python", f"from transformers import {auto}", ""]
    if dbp:
        lines += ["import hf_dbp  # pip install hf-dbp", "",
                  f'model = hf_dbp.load_decorrelated({auto}, "{load_path}")  # every R restored',
                  "plain = hf_dbp.merge_decorrelation(model)  # R folded into the weights: a plain model", "```", "",
                  f'`{auto}.from_pretrained("{load_path}")` without hf-dbp loads the weights without R (a different '
                  "model); merge first to publish a checkpoint for plain transformers."]  # fmt: skip
    else:
        lines += [f'model = {auto}.from_pretrained("{load_path}")', "```"]
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + "\n".join(lines) + "\n")


_VARIANCE_TERMS = {"rows": "rows, diag(v) R", "columns": "columns, R diag(v) (the reference code's form)"}


def card_training_facts(folder: str) -> dict:
    """What the hf-dbp card in `folder` says about the training: `datasets`, `steps`, `training_seconds` (the keys
    found), for a card written from it (`hf-dbp merge` keeps them)."""
    path = os.path.join(folder, "README.md")
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as file:
        text = file.read()
    facts = {}
    if match := re.search(r"^\| data \| (.+) \|$", text, re.MULTILINE):
        facts["datasets"] = match.group(1).split(", ")  # the card joined them so: ids stay ids
    if match := re.search(r"^\| optimizer steps \| (\d+) \|$", text, re.MULTILINE):
        facts["steps"] = int(match.group(1))
    if match := re.search(r"^\| training time \| ([0-9.]+) s ", text, re.MULTILINE):
        facts["training_seconds"] = float(match.group(1))
    return facts


def _dbp_settings(config) -> dict | None:
    """The DBP settings of a pre-training config or of an UperNet's backbone; None for plain BP."""
    source = config.backbone_config if _is_segmentation(config) else config
    values = {k: getattr(source, k, None) for k in DBP_CONFIG_FIELDS}
    return values if values["decorrelation_layers"] else None


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
    """A model card for a checkpoint of hf-dbp: MAE pre-training, segmentation, or any decorrelated model.

    Args:
        config: the saved model's config: `vit_mae_dbp`, `vit_mae` or `upernet`, or that of any model decorrelated
            with `hf_dbp.decorrelate` (or its BP baseline).
        model_name: the name in the model index (e.g. the Hub repo id or the folder name).
        results: metrics as in `all_results.json` (`eval_loss`; `eval_mean_iou`, ...).
        emissions: the run's energy and CO2; omitted from the metadata when unknown.
        datasets: the training data sets (Hub ids or descriptions).
        base_model: the checkpoint this one was fine-tuned (or merged) from.
        training_seconds, steps: training time and optimizer steps.
        merged_from: for `hf-dbp merge` output: the DBP checkpoint whose R were folded in.
        extra_tags: more tags.
        trained_with: for `hf-dbp merge` output: the DBP settings of the checkpoint it was merged from.
        load_path: what the card's loading code passes to `from_pretrained`: the Hub repo id once pushed, the
            folder's absolute path locally (default: `model_name`).
    """
    results = results or {}
    load_path = load_path or model_name
    if not _is_vit_mae(config):
        return _generic_card(config, model_name, results, emissions, datasets, base_model, training_seconds, steps,
                             extra_tags, load_path)  # fmt: skip
    segmentation = _is_segmentation(config)
    dbp = _dbp_settings(config)
    tags = ["hf-dbp", "mae", "vision-transformer"] + (["dbp", "decorrelated-backpropagation"] if dbp or merged_from else [])
    tags += ["semantic-segmentation", "upernet"] if segmentation else ["image-pretraining"]
    tags += [tag for tag in dict.fromkeys(extra_tags or []) if tag not in tags]
    metrics = SEGMENTATION_METRICS if segmentation else PRETRAINING_METRICS
    dataset_name = (datasets or ["unspecified"])[0]
    eval_results = [
        EvalResult(
            task_type="image-segmentation" if segmentation else "masked-image-modeling",
            task_name="Semantic segmentation" if segmentation else "MAE pre-training",
            dataset_type=dataset_name, dataset_name=dataset_name, dataset_split="validation",
            metric_type=key.removeprefix("eval_"), metric_name=label, metric_value=float(results[key]),
        )  # fmt: skip
        for key, label in metrics.items()
        if key in results
    ]
    co2 = None
    if emissions is not None:
        co2 = {
            "emissions": emissions.emissions_g,
            "source": "codecarbon",
            "training_type": "fine-tuning" if segmentation or base_model else "pre-training",
            "geographical_location": emissions.location,
            "hardware_used": emissions.hardware,
        }
    # The metadata's base_model is a Hub id; a local folder is named in the body only.
    hub_base_model = base_model if base_model and not os.path.exists(base_model) else None
    data = ModelCardData(
        library_name="transformers",
        tags=tags,
        datasets=hub_dataset_ids(datasets) or None,
        base_model=hub_base_model,
        model_name=model_name,
        eval_results=eval_results or None,
        co2_eq_emissions=co2,
    )
    return ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + _body(
        config, model_name, results, emissions, datasets, base_model, training_seconds, steps, merged_from, dbp, metrics,
        load_path, trained_with,
    ))  # fmt: skip


def _body(config, model_name, results, emissions, datasets, base_model, seconds, steps, merged_from, dbp, metrics,
          load_path, trained_with=None) -> str:  # fmt: skip
    segmentation = _is_segmentation(config)
    encoder = config.backbone_config if segmentation else config
    size = (f"{encoder.num_hidden_layers} blocks, width {encoder.hidden_size}, {encoder.image_size} px pre-training "
            f"images, patch {encoder.patch_size}")  # fmt: skip
    lines = [f"# {model_name}", ""]
    if segmentation:
        lines.append(f"UperNet for semantic segmentation ({config.num_labels} classes) on a ViT encoder ({size}) "
                     "pre-trained as a masked autoencoder, fine-tuned with [hf-dbp](https://github.com/hf-dbp/hf-dbp).")  # fmt: skip
    elif merged_from:
        lines.append(f"A ViT masked autoencoder ({size}) pre-trained with decorrelated backpropagation (DBP), with "
                     f"every decorrelation matrix R folded into its weights (`hf-dbp merge {merged_from}`): a plain "
                     "ViTMAE checkpoint with the same outputs, no extra cost, and no dependency on hf-dbp.")  # fmt: skip
    else:
        method = "decorrelated backpropagation (DBP)" if dbp else "plain backpropagation (the BP baseline)"
        lines.append(f"A ViT masked autoencoder ({size}, mask ratio {config.mask_ratio}) pre-trained with {method} "
                     "using [hf-dbp](https://github.com/hf-dbp/hf-dbp), after *Decorrelation Speeds Up Vision "
                     "Transformers* (arXiv 2510.14657).")  # fmt: skip
    lines += ["", "## Decorrelation", ""]
    if dbp:
        lines += [
            "Each decorrelated layer computes y = W (R x) + b; R is updated after every optimizer step to decorrelate "
            "the layer's inputs.", "",
            "| setting | value |", "| --- | --- |",
            f"| layers | {', '.join(dbp['decorrelation_layers'])} |",
            f"| decorrelation lr | {dbp['decorrelation_lr']} |",
            f"| kappa | {dbp['decorrelation_kappa']} |",
            f"| sample fraction | {dbp['decorrelation_sample_fraction']} |",
            f"| variance term | {_VARIANCE_TERMS.get(dbp['decorrelation_variance_form'], 'rows, diag(v) R')} |",
        ]  # fmt: skip
    elif merged_from and trained_with:
        lines += [
            "Pre-trained with these DBP settings; every R is now folded into its layer's weight (W R), so the model "
            "computes the same outputs with plain layers.", "",
            "| setting | value |", "| --- | --- |",
            f"| layers | {', '.join(trained_with['decorrelation_layers'])} |",
            f"| decorrelation lr | {trained_with['decorrelation_lr']} |",
            f"| kappa | {trained_with['decorrelation_kappa']} |",
            f"| sample fraction | {trained_with['decorrelation_sample_fraction']} |",
        ]  # fmt: skip
    elif merged_from or segmentation:
        lines.append("The encoder holds no R: any decorrelation from pre-training is folded into its weights.")
    else:
        lines.append("None: this is the plain BP baseline.")
    lines += ["", "## Training", "", "| | |", "| --- | --- |"]
    if datasets:
        lines.append(f"| data | {', '.join(datasets)} |")
    if base_model:
        lines.append(f"| started from | {base_model} |")
    if steps is not None:
        lines.append(f"| optimizer steps | {steps} |")
    if seconds is not None:
        lines.append(f"| training time | {seconds:.1f} s ({seconds / 3600:.2f} h) |")
    if emissions is not None:
        lines += [
            f"| energy | {emissions.energy_kwh:.6g} kWh |",
            f"| emissions | {emissions.emissions_g:.6g} g CO2-eq (codecarbon) |",
            f"| location | {emissions.location} |",
            f"| hardware | {emissions.hardware} |",
        ]
    shown = [(label, results[key]) for key, label in metrics.items() if key in results]
    if shown:
        lines += ["", "## Results", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {label} | {value:.4f} |" for label, value in shown]
    lines += ["", "## How to load", "", "```python"]
    if segmentation:
        lines += ["import hf_dbp  # registers the backbone", "from transformers import AutoModelForSemanticSegmentation", "",
                  f'model = AutoModelForSemanticSegmentation.from_pretrained("{load_path}")']  # fmt: skip
    elif dbp:
        lines += ["import hf_dbp  # pip install hf-dbp: registers vit_mae_dbp", "from transformers import AutoModelForPreTraining", "",
                  f'model = AutoModelForPreTraining.from_pretrained("{load_path}")', "```", "",
                  "Without hf-dbp: the checkpoint carries its code, so `AutoModelForPreTraining.from_pretrained("
                  f'"{load_path}", trust_remote_code=True)` loads it with plain transformers (read the code first: '
                  "`modeling_vit_mae_dbp.py`, `decorrelation.py`). Or fold R into the weights once "
                  "(`hf-dbp merge CHECKPOINT OUT`) for a plain ViTMAE checkpoint (`ViTMAEForPreTraining`, or "
                  "`ViTModel` for the encoder) with no custom code at all."]  # fmt: skip
    else:
        lines += ["from transformers import ViTMAEForPreTraining, ViTModel", "",
                  f'model = ViTMAEForPreTraining.from_pretrained("{load_path}")',
                  f'encoder = ViTModel.from_pretrained("{load_path}", add_pooling_layer=False)  # the encoder alone']  # fmt: skip
    if not lines[-1].startswith("Without hf-dbp"):
        lines.append("```")
    lines.append("")
    return "\n".join(lines)


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
