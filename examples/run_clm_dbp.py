#!/usr/bin/env python
"""Pre-train a causal language model (GPT-2, Llama, Qwen2, Mistral, ...) with decorrelated backpropagation (DBP), or
the plain BP baseline.

Follows transformers' examples/pytorch/language-modeling/run_clm.py. Launch with accelerate (one or many processes):

    accelerate launch examples/run_clm_dbp.py                        # offline demo: a small Llama on Shakespeare
    accelerate launch examples/run_clm_dbp.py --train_file my.txt --validation_file val.txt --output_dir out
    accelerate launch examples/run_clm_dbp.py --model_name_or_path gpt2 --dataset_name wikitext \
        --dataset_config_name wikitext-2-raw-v1 --bp_baseline

A JSON or YAML file as the only argument holds the same fields as the command-line flags. Without a tokenizer
(`--tokenizer_name` or `--model_name_or_path`), a byte-level BPE tokenizer is trained on the training text and saved
with the model.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from itertools import chain

import datasets
from datasets import load_dataset
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    default_data_collator,
    set_seed,
)

import hf_dbp
from hf_dbp import DBPTrainer, DecorrelationConfig
from hf_dbp.core.config import CONFIG_ATTRIBUTE, VARIANCE_FORMS
from hf_dbp.core.model import from_pretrained_checked
from hf_dbp.tasks.scripts import (
    DecorrelationPresetArguments,
    TrainingBegan,
    parse_script_arguments,
    run_main,
    saved_files,
    setup_logging,
)
from hf_dbp.tasks.text_data import DEMO_MODEL, TEXT_SETS, demo_text_dataset
from hf_dbp.training.checkpoints import check_pretrained
from hf_dbp.training.hub import ensure_hub_reachable
from hf_dbp.training.plotting import plot_training_curves
from hf_dbp.training.training_args import DBPTrainingArguments

logger = logging.getLogger(__name__)

# What `accelerate launch examples/run_clm_dbp.py` with no argument runs: a small Llama on Shakespeare's plays, a few
# minutes on 2 CPU cores.
DEMO_ARGS = {
    "output_dir": "outputs/clm-dbp-demo",
    "model_type": "llama",
    "config_overrides": DEMO_MODEL,
    "block_size": 128,
    "tokenizer_vocab_size": 2048,
    "max_eval_samples": 128,
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "max_steps": 400,
    # DBP's best peak rate of 1e-3, 2e-3, 4e-3 and 8e-3 on this text (examples/compare_bp_dbp_clm.py; BP's best is 4e-3)
    "learning_rate": 8e-3,
    "weight_decay": 0.1,
    "adam_beta2": 0.95,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 40,
    "decorrelation_lr_schedule": "tied",
    "logging_steps": 20,
    "eval_strategy": "steps",
    "eval_steps": 50,
    "save_strategy": "no",
    "dataloader_num_workers": 0,
    "seed": 0,
    "report_to": "none",
}


@dataclass
class ModelArguments:
    """Which model to pre-train, as in run_clm.py."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A checkpoint to start from (plain or decorrelated); leave out to train from scratch."},
    )
    model_type: str | None = field(
        default=None, metadata={"help": "From scratch: the model type, e.g. 'llama', 'gpt2', 'qwen2', 'mistral'."}
    )
    config_name: str | None = field(
        default=None, metadata={"help": "A config to train from scratch (name or path), if not the model's."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Override config values from scratch, e.g. 'hidden_size=128,num_hidden_layers=4'."},
    )
    tokenizer_name: str | None = field(
        default=None,
        metadata={
            "help": "A tokenizer (name or path), if not the model's; without either one is trained on the data."
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where to store downloaded models and datasets."})
    model_revision: str = field(default="main", metadata={"help": "Model version (branch, tag or commit)."})
    token: str | None = field(default=None, metadata={"help": "Hub token for private models or datasets."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow models and datasets with their own code from the Hub."}
    )


@dataclass
class DataTrainingArguments:
    """Which text to train and evaluate on, as in run_clm.py."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Name of a dataset on the Hub (or a local folder)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration name of the dataset."})
    train_file: str | None = field(
        default=None, metadata={"help": "A text file (.txt), or a .csv/.json/.jsonl file with a 'text' column."}
    )
    validation_file: str | None = field(default=None, metadata={"help": "The same for validation."})
    text_column_name: str | None = field(
        default=None, metadata={"help": "Column holding the text (default: 'text', else the first column)."}
    )
    validation_split_percentage: int = field(
        default=5, metadata={"help": "Percent of train held out for validation when there is no validation split."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many validation blocks."})
    block_size: int | None = field(
        default=None, metadata={"help": "Tokens per training sequence (default: the model's maximum, at most 1024)."}
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenizing."})
    keep_linebreaks: bool = field(default=True, metadata={"help": "Keep line breaks in .txt files."})
    demo_text: str = field(
        default="default",
        metadata={
            "help": "Without a dataset: the embedded 'default' text (Shakespeare), or a held-out set no setting was tuned on: 'heldout_plays', 'heldout_python_docs'.",
            "choices": list(TEXT_SETS),
        },
    )
    tokenizer_vocab_size: int = field(
        default=2048, metadata={"help": "Vocabulary of the tokenizer trained on the data when there is none."}
    )

    def __post_init__(self) -> None:
        # Checked before anything is read: a wrong file name or kind should not cost a tokenization.
        for name in ("train_file", "validation_file"):
            path = getattr(self, name)
            if path is None:
                continue
            if not os.path.isfile(path):
                raise ValueError(f"--{name} {path} does not exist or is not a file")
            if path.rsplit(".", 1)[-1] not in ("txt", "csv", "json", "jsonl"):
                raise ValueError(f"--{name} {path} must be a .txt, .csv, .json or .jsonl file")
        if self.validation_file is not None and self.train_file is None:
            raise ValueError("--validation_file needs --train_file")
        if self.dataset_name is not None and self.train_file is not None:
            raise ValueError("give --dataset_name or --train_file, not both")
        if self.block_size is not None and self.block_size < 2:
            raise ValueError(f"--block_size must be at least 2, got {self.block_size}")
        if not 0 <= self.validation_split_percentage < 100:
            raise ValueError(
                f"--validation_split_percentage must be in [0, 100), got {self.validation_split_percentage}"
            )


@dataclass
class DBPArguments(DecorrelationPresetArguments):
    """Decorrelated backpropagation settings (see hf_dbp.DecorrelationConfig)."""

    bp_baseline: bool = field(
        default=False,
        metadata={"help": "Train the plain BP model instead (the decorrelation loss is still measured)."},
    )
    decorrelation_lr: float = field(default=1e-3, metadata={"help": "Step size of the R update."})
    decorrelation_kappa: float = field(
        default=1e-2, metadata={"help": "0 = pure decorrelation, 1 = pure variance normalisation."}
    )
    decorrelation_sample_fraction: float = field(
        default=0.1, metadata={"help": "Fraction of tokens per forward used for R's statistics."}
    )
    target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Layers to decorrelate: names (e.g. q_proj v_proj), one regular expression, or 'all-linear' (default: the architecture's defaults, hf_dbp.TARGET_MODULES)."
        },
    )
    exclude_modules: list[str] | None = field(
        default=None, metadata={"help": "Layers never to decorrelate (names or one regular expression)."}
    )
    decorrelation_variance_form: str = field(
        default="rows",
        metadata={
            "help": "The variance term of the R update: 'rows' (diag(v) R) or 'columns' (R diag(v), the reference code).",
            "choices": list(VARIANCE_FORMS),
        },
    )

    def decorrelation_config(self) -> DecorrelationConfig:
        def one_or_list(values):  # a single entry is a name, a regular expression or "all-linear"
            if values is None or len(values) != 1:
                return values
            only = values[0]
            return only if only == "all-linear" or any(c in only for c in "*+?[](){}|^$\\") else values

        return DecorrelationConfig(
            lr=self.decorrelation_lr,
            kappa=self.decorrelation_kappa,
            sample_fraction=self.decorrelation_sample_fraction,
            target_modules=one_or_list(self.target_modules),
            exclude_modules=one_or_list(self.exclude_modules),
            variance_form=self.decorrelation_variance_form,
            block_size=self.block_size(),
        )


def parse_args():
    return parse_script_arguments(
        (ModelArguments, DataTrainingArguments, DBPArguments, DBPTrainingArguments), DEMO_ARGS
    )


def load_text(data_args: DataTrainingArguments, model_args: ModelArguments) -> datasets.DatasetDict:
    hub = {"cache_dir": model_args.cache_dir, "token": model_args.token}
    if data_args.dataset_name is not None:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name, **hub)
    elif data_args.train_file is not None:
        files = {"train": data_args.train_file}
        if data_args.validation_file is not None:
            files["validation"] = data_args.validation_file
        extension = data_args.train_file.rsplit(".", 1)[-1]
        builder = {"txt": "text", "jsonl": "json"}.get(extension, extension)
        kwargs = {"keep_linebreaks": data_args.keep_linebreaks} if builder == "text" else {}
        raw = load_dataset(builder, data_files=files, **hub, **kwargs)
    else:
        logger.info(
            "No --dataset_name or --train_file: using the embedded %r text set (see hf_dbp.tasks.text_data).",
            data_args.demo_text,
        )
        raw = demo_text_dataset(data_args.demo_text)
    if not isinstance(raw, datasets.DatasetDict):
        raw = datasets.DatasetDict(train=raw)
    if "train" not in raw:
        raise ValueError(f"the dataset has no 'train' split; its splits are {list(raw)}")
    if "validation" not in raw and data_args.validation_split_percentage > 0:
        split = raw["train"].train_test_split(data_args.validation_split_percentage / 100, seed=0)
        raw["train"], raw["validation"] = split["train"], split["test"]
    return raw


def text_column(dataset: datasets.Dataset, name: str | None) -> str:
    if name is not None:
        if name not in dataset.column_names:
            raise ValueError(f"--text_column_name {name!r} is not a column; the columns are {dataset.column_names}")
        return name
    return "text" if "text" in dataset.column_names else dataset.column_names[0]


def train_tokenizer(texts, vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2's kind: every byte is representable) trained on `texts`."""
    from tokenizers import ByteLevelBPETokenizer

    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(texts, vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer._tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def build_tokenizer(model_args: ModelArguments, data_args: DataTrainingArguments, raw, column: str):
    source = model_args.tokenizer_name or model_args.model_name_or_path
    if source is not None:
        return AutoTokenizer.from_pretrained(
            source,
            cache_dir=model_args.cache_dir,
            revision=model_args.model_revision,
            token=model_args.token,
            trust_remote_code=model_args.trust_remote_code,
        )
    logger.info(
        "No tokenizer given: training a byte-level BPE tokenizer (%d tokens) on the training text",
        data_args.tokenizer_vocab_size,
    )
    return train_tokenizer(raw["train"][column], data_args.tokenizer_vocab_size)


def check_architecture(model_args: ModelArguments, dbp_args: DBPArguments) -> None:
    """Before any data is read: an architecture without default target modules needs --target_modules."""
    if dbp_args.bp_baseline or dbp_args.target_modules is not None:
        return
    model_type = model_args.model_type
    if model_type is None and (model_args.config_name or model_args.model_name_or_path):
        model_type = AutoConfig.from_pretrained(
            model_args.config_name or model_args.model_name_or_path,
            cache_dir=model_args.cache_dir,
            revision=model_args.model_revision,
            token=model_args.token,
            trust_remote_code=model_args.trust_remote_code,
        ).model_type
    if model_type is not None and model_type not in hf_dbp.TARGET_MODULES:
        raise ValueError(
            f"hf_dbp has no default target modules for model type {model_type!r}: pass --target_modules "
            f"(layer names, a regular expression or 'all-linear'). Defaults exist for: "
            f"{sorted(hf_dbp.TARGET_MODULES)}"
        )


def build_model(model_args: ModelArguments, dbp_args: DBPArguments, tokenizer):
    """The model: loaded (a decorrelated checkpoint with its R) or from scratch; decorrelated unless --bp_baseline."""
    load = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }
    if model_args.model_name_or_path is not None:
        if model_args.config_overrides is not None:
            logger.warning("--config_overrides is ignored: the architecture comes from --model_name_or_path")
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, **load)
        if getattr(config, CONFIG_ATTRIBUTE, None):
            model = hf_dbp.load_decorrelated(AutoModelForCausalLM, model_args.model_name_or_path, **load)
            # A decorrelated checkpoint continued as BP is its plain equivalent: R folded into the weights. Continued
            # as DBP it keeps its R and its own decorrelation settings but for the step's, which the flags give.
            if dbp_args.bp_baseline:
                return hf_dbp.merge_decorrelation(model, inplace=True)
            settings = dbp_args.decorrelation_config()
            stored = getattr(model.config, CONFIG_ATTRIBUTE)
            stored.update(lr=settings.lr, kappa=settings.kappa, variance_form=settings.variance_form)
            return model
        model = from_pretrained_checked(AutoModelForCausalLM, model_args.model_name_or_path, **load)
    else:
        if model_args.config_name is not None:
            config = AutoConfig.from_pretrained(model_args.config_name, **load)
        elif model_args.model_type is not None:
            config = AutoConfig.for_model(model_args.model_type)
        else:
            raise ValueError("give --model_name_or_path, --config_name or --model_type (e.g. --model_type llama)")
        if model_args.config_overrides is not None:
            config.update_from_string(model_args.config_overrides)
        config.vocab_size = len(tokenizer)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(config, name, getattr(tokenizer, name, None))
        logger.warning("Training a new model from scratch")
        model = AutoModelForCausalLM.from_config(config)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    return model if dbp_args.bp_baseline else hf_dbp.decorrelate(model, dbp_args.decorrelation_config())


def tokenize_and_group(raw, tokenizer, column: str, block_size: int, data_args, training_args):
    """As run_clm.py: tokenize every text, concatenate, and cut into blocks of `block_size` tokens (labels = inputs)."""

    def tokenize(examples):
        return tokenizer([text + tokenizer.eos_token if tokenizer.eos_token else text for text in examples[column]])

    def group(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total = (len(concatenated["input_ids"]) // block_size) * block_size
        blocks = {k: [t[i : i + block_size] for i in range(0, total, block_size)] for k, t in concatenated.items()}
        blocks["labels"] = [ids.copy() for ids in blocks["input_ids"]]
        return blocks

    with training_args.main_process_first(desc="tokenizing"):
        tokenized = raw.map(
            tokenize,
            batched=True,
            num_proc=data_args.preprocessing_num_workers,
            remove_columns=raw["train"].column_names,
            desc="Tokenizing",
        )
        return tokenized.map(
            group,
            batched=True,
            batch_size=1000,
            num_proc=data_args.preprocessing_num_workers,
            desc=f"Grouping into blocks of {block_size}",
        )


def main() -> None:
    model_args, data_args, dbp_args, training_args = parse_args()
    settings = dbp_args.decorrelation_config()  # checked before anything is read
    if model_args.model_name_or_path is not None:
        check_pretrained(model_args.model_name_or_path)  # a damaged local checkpoint: its file and what is wrong
    check_architecture(model_args, dbp_args)
    if training_args.push_to_hub:  # before anything slow: fail now rather than after training
        ensure_hub_reachable(training_args.hub_token)

    setup_logging(training_args, __name__)
    method = "BP (plain backpropagation)" if dbp_args.bp_baseline else "DBP (decorrelated backpropagation)"

    set_seed(training_args.seed)
    raw = load_text(data_args, model_args)
    column = text_column(raw["train"], data_args.text_column_name)
    tokenizer = build_tokenizer(model_args, data_args, raw, column)
    model = build_model(model_args, dbp_args, tokenizer)
    block_size = data_args.block_size or min(1024, getattr(model.config, "max_position_embeddings", 1024))
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is not None and block_size > limit:
        raise ValueError(f"--block_size {block_size} is longer than the model's {limit} positions")
    lm = tokenize_and_group(raw, tokenizer, column, block_size, data_args, training_args)
    for split, max_samples in (("train", data_args.max_train_samples), ("validation", data_args.max_eval_samples)):
        if split in lm and max_samples is not None:
            lm[split] = lm[split].select(range(min(max_samples, len(lm[split]))))
        if split in lm and len(lm[split]) == 0:
            raise ValueError(f"the {split!r} split has fewer than --block_size {block_size} tokens")

    logger.info(
        "%s of a %s (%d layers, width %d, %.1fM parameters) on %d blocks of %d tokens (%d for validation)%s",
        method,
        model.config.model_type,
        model.config.num_hidden_layers,
        model.config.hidden_size,
        sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6,
        len(lm["train"]),
        block_size,
        len(lm.get("validation", [])),
        "" if dbp_args.bp_baseline else f", {len(hf_dbp.core.model.decorrelation_modules(model))} matrices R",
    )

    trainer = DBPTrainer(
        model=model,
        args=training_args,
        train_dataset=lm["train"],
        eval_dataset=lm.get("validation"),
        processing_class=tokenizer,
        data_collator=default_data_collator,
        callbacks=[TrainingBegan()],
        decorrelation_config=settings if dbp_args.bp_baseline else None,
        model_card_kwargs={
            "datasets": [
                data_args.dataset_name or data_args.train_file or f"hf-dbp embedded text ({data_args.demo_text})"
            ],
            "base_model": model_args.model_name_or_path,
        },
    )
    # A path is checked; otherwise the newest whole checkpoint in output_dir, if any (hf_dbp.training.checkpoints).
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint or True)
    trainer.save_model()
    metrics = dict(train_result.metrics)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()

    if "validation" in lm:
        metrics = trainer.evaluate()
        metrics["perplexity"] = math.exp(metrics["eval_loss"]) if metrics["eval_loss"] < 50 else float("inf")
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    trainer.create_model_card()  # now that all_results.json and emissions.csv are final

    if trainer.is_world_process_zero():
        plot_training_curves(
            trainer.state.log_history,
            os.path.join(training_args.output_dir, "training_curves.png"),
            title=f"{method}: causal language modelling",
        )
        logger.info(
            "Done: %s, %s. Eval loss %s (perplexity %s). Outputs in %s (model + tokenizer, load with %s): %s.",
            method,
            trainer.training_summary(),
            f"{metrics['eval_loss']:.4f}" if "eval_loss" in metrics else "n/a",
            f"{metrics['perplexity']:.2f}" if "perplexity" in metrics else "n/a",
            os.path.abspath(training_args.output_dir),
            "AutoModelForCausalLM.from_pretrained"
            if dbp_args.bp_baseline
            else "hf_dbp.load_decorrelated(AutoModelForCausalLM, ...)",
            saved_files(training_args.output_dir),
        )

    if training_args.push_to_hub:
        trainer.push_to_hub(tags=["text-generation"] + ([] if dbp_args.bp_baseline else ["dbp"]))


if __name__ == "__main__":
    run_main(main)  # a mistake in the arguments prints as one line (hf_dbp.tasks.scripts.run_main)
