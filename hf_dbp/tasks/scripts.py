"""What every example script does the same way: read its arguments, set up its logging."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

import datasets
import transformers
from transformers import HfArgumentParser


def parse_script_arguments(dataclass_types: Sequence[type], demo_args: dict) -> tuple:
    """As transformers' example scripts: the command-line flags, or a JSON/YAML file as the only argument; with no
    argument at all, `demo_args` (the script's embedded offline default)."""
    parser = HfArgumentParser(tuple(dataclass_types))
    if len(sys.argv) == 1:
        return parser.parse_dict(demo_args)
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        return parser.parse_json_file(os.path.abspath(sys.argv[1]))
    if len(sys.argv) == 2 and sys.argv[1].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(os.path.abspath(sys.argv[1]))
    return parser.parse_args_into_dataclasses()


def setup_logging(training_args: transformers.TrainingArguments, script_logger: str) -> None:
    """transformers' and datasets' verbosity from the process's log level; the script's own account of what it does
    (and hf_dbp's) goes to the main process's log even at the default level."""
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])  # fmt: skip
    log_level = training_args.get_process_log_level()
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    for name in (script_logger, "hf_dbp"):
        logging.getLogger(name).setLevel(logging.INFO if training_args.should_log else log_level)
