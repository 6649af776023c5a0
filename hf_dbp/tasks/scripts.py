"""What every example script does the same way: read its arguments (and the flags that choose R's form), set up its
logging, end its process."""

from __future__ import annotations

import atexit
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import datasets
import torch
import transformers
from transformers import HfArgumentParser, TrainerCallback

from ..core.config import PRESETS


@dataclass
class DecorrelationPresetArguments:
    """The flags of the example scripts that choose the form of R: a named preset, and its block size."""

    decorrelation_preset: str = field(
        default="paper",
        metadata={
            "help": "Named DBP settings (hf_dbp.core.config.PRESETS): 'paper' (full R, the method as published) or "
            "'fast' (block-diagonal R, blocks of 384 inputs); --decorrelation_block_size overrides it.",
            "choices": list(PRESETS),
        },
    )
    decorrelation_block_size: int | None = field(
        default=None,
        metadata={
            "help": "Block-diagonal R with blocks of at most this many inputs (cheaper; default: the preset's, full R "
            "for 'paper')."
        },
    )

    def block_size(self) -> int | None:
        """--decorrelation_block_size, else the preset's (None: full R)."""
        if self.decorrelation_block_size is not None:
            return self.decorrelation_block_size
        return PRESETS[self.decorrelation_preset].get("block_size")


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
    files = [arg for arg in sys.argv[1:] if arg.endswith((".json", ".yaml", ".yml")) and not arg.startswith("-")]
    if files and sys.argv[1] in files:
        # transformers' convention: a settings file is the only argument, or flags only; say so instead of argparse's
        # "unrecognized arguments".
        parser.error(
            f"{files[0]} is a settings file: give it as the only argument (`{os.path.basename(sys.argv[0])} "
            f"{files[0]}`), or give every setting as flags; a file plus flags is not read. Put "
            f"{' '.join(sys.argv[2:])} into the file instead."
        )
    return parser.parse_args_into_dataclasses()


FULL_TRACEBACK_VARIABLE = "HF_DBP_FULL_TRACEBACK"
"""Set to 1 to see the traceback of an error `run_main` would print as one line."""


class TrainingBegan(TrainerCallback):
    """Marks that this process's training began (`began`): from then on an error is the run's, not the arguments'
    (see `run_main`). Every example script gives its trainer one."""

    began = False

    def on_train_begin(self, args, state, control, **kwargs):
        TrainingBegan.began = True


def run_main(main: Callable[[], None]) -> None:
    """Run a script's `main`, printing what the user can fix as one line rather than a traceback.

    A bad flag value, a missing folder, a checkpoint of another kind, an unreachable Hub (ValueError, OSError and
    hf_dbp's HubUnreachableError, raised before training starts) print `<script>: error: <message>` on stderr and
    exit with status 1, as argparse does for a flag it does not know; so do those of a checkpoint found broken before
    training. Errors raised once training began ([`TrainingBegan`]: in training, evaluation, saving, the card, the
    push) keep their traceback: they are the run's, not the arguments'. `HF_DBP_FULL_TRACEBACK=1` keeps it for every
    error. Under `accelerate launch` the launcher adds its own CalledProcessError after the line; `accelerate launch
    --quiet` leaves it out."""
    from ..training.hub import HubUnreachableError

    try:
        main()
    except (ValueError, OSError, HubUnreachableError) as error:
        if os.environ.get(FULL_TRACEBACK_VARIABLE, "") not in ("", "0") or TrainingBegan.began:
            raise
        sys.stdout.flush()
        print(f"{os.path.basename(sys.argv[0])}: error: {error}", file=sys.stderr)
        sys.exit(1)
    end_distributed_process()


def end_distributed_process() -> None:
    """End a process of a multi-process run now, after its work is done, without Python's interpreter teardown.

    Why: a collective's work object holds tensors that Python owns, and gloo's worker thread may drop the last
    reference to it just after the collective returns. If the interpreter has begun finalizing by then (the
    collective was the script's last act), that thread cannot take the GIL, Python ends it with `pthread_exit`, and
    the unwinding through torch's C++ frames calls `std::terminate`: "terminate called without an active exception",
    exit -6, after a run that succeeded (here in 2 of 94 runs of a DDP worker, some beside busy loops; a core dump
    shows `AsyncAllgatherWork::~AsyncAllgatherWork` -> `decref_pyobject` -> `take_gil` -> `pthread_exit`).
    `destroy_process_group` cannot prevent it while DDP still references the group (its threads live on). So: run the
    `atexit` handlers (logging, trackers such as wandb's, codecarbon's) and flush, as an exit would, then leave with
    `os._exit(0)`, before any finalization. A single process returns at once and exits as usual.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def setup_logging(training_args: transformers.TrainingArguments, script_logger: str) -> None:
    """transformers' and datasets' verbosity from the process's log level; the script's own account of what it does
    (and hf_dbp's) goes to the main process's log even at the default level."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    for name in (script_logger, "hf_dbp"):
        logging.getLogger(name).setLevel(logging.INFO if training_args.should_log else log_level)


def saved_files(folder: str) -> str:
    """The files a run left in `folder` (not its checkpoint folders), for the last line of its log: only what is
    there (no emissions.csv without emissions tracking, no plot that was not drawn)."""
    names = sorted(name for name in os.listdir(folder) if os.path.isfile(os.path.join(folder, name)))
    return ", ".join(names) if names else "nothing"


def image_normalisation(
    image_processor_name: str | None, checkpoint: str | None, **load_kwargs
) -> tuple[list[float], list[float], str]:
    """The (image_mean, image_std) a script normalises with, and where they come from: `--image_processor_name` (as
    transformers' run_mae.py and run_semantic_segmentation.py), else the checkpoint's own image processor (one saved by
    these scripts carries it), else ImageNet's. A processor named but not loadable is an error; a checkpoint without
    one is not. `load_kwargs` go to `AutoImageProcessor.from_pretrained` (cache_dir, revision, token,
    trust_remote_code)."""
    from transformers import AutoImageProcessor

    from .image_data import IMAGENET_MEAN, IMAGENET_STD

    name = image_processor_name or checkpoint
    if name is not None:
        try:
            found = AutoImageProcessor.from_pretrained(name, **load_kwargs)
        except (OSError, ValueError) as error:
            if image_processor_name is not None:  # asked for by name: its absence is the user's to fix
                raise ValueError(
                    f"--image_processor_name {name}: no image processor could be loaded ({error})"
                ) from None
            logging.getLogger(__name__).warning(
                "No image processor loaded from %s (%s): normalising with ImageNet's mean and std; give "
                "--image_processor_name to choose",
                name,
                str(error).splitlines()[0],
            )
        else:
            if getattr(found, "image_mean", None) is not None and getattr(found, "image_std", None) is not None:
                return list(found.image_mean), list(found.image_std), f"{name}'s {type(found).__name__}"
    return list(IMAGENET_MEAN), list(IMAGENET_STD), "ImageNet's"
