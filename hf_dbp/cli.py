"""The `hf-dbp` command: `hf-dbp merge CHECKPOINT OUT`, `hf-dbp push FOLDER REPO_ID`."""

from __future__ import annotations

import argparse
import os
import shutil
import sys


def merge(checkpoint: str, output: str) -> str:
    """Fold every R of a decorrelated checkpoint (any model saved after `hf_dbp.decorrelate`, a DBP-MAE, an UperNet
    fine-tuned with R kept) into its weights and save the plain checkpoint, with its processor or tokenizer and its
    card."""
    import transformers
    from transformers import AutoConfig

    from . import load_decorrelated, merge_decorrelation
    from .core.model import is_decorrelated_config
    from .models.card_profiles import auto_class
    from .training.hub import check_model_folder, checkpoint_not_found
    from .training.model_card import (
        decorrelation_of,
        read_card_facts,
        read_emissions_csv,
        read_results,
        write_model_card,
    )

    check_model_folder(checkpoint, "checkpoint")
    if os.path.abspath(os.path.expanduser(output)) == os.path.abspath(os.path.expanduser(checkpoint)):
        raise ValueError(
            f"the output folder {output} is the checkpoint itself: choose another, the merge writes a new one"
        )
    try:
        config = AutoConfig.from_pretrained(checkpoint)
    except OSError as error:
        raise checkpoint_not_found(checkpoint, "checkpoint", error) from None
    if not is_decorrelated_config(config):
        raise ValueError(
            f"{checkpoint} is a plain {config.model_type!r} checkpoint: it has no R to fold (`hf-dbp merge` takes a "
            "checkpoint of a model decorrelated with hf_dbp.decorrelate, a 'vit_mae_dbp' one, or an UperNet "
            "fine-tuned with R kept)"
        )
    auto = getattr(transformers, auto_class(config)[0])
    merged = merge_decorrelation(load_decorrelated(auto, checkpoint), inplace=True)
    merged.save_pretrained(output)
    # What a user needs with the weights: the processor or tokenizer, and the results.
    for name in (
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
        "all_results.json",
    ):
        if os.path.isfile(os.path.join(checkpoint, name)):
            shutil.copy(os.path.join(checkpoint, name), os.path.join(output, name))
    # The merged card keeps what the source's card said about the training: data, steps, time, DBP settings.
    facts = read_card_facts(checkpoint) if os.path.isdir(checkpoint) else {}
    write_model_card(
        output,
        merged.config,
        results=read_results(checkpoint),
        emissions=read_emissions_csv(checkpoint),
        merged_from=checkpoint,
        base_model=None if os.path.isdir(checkpoint) else checkpoint,
        trained_with=facts.pop("decorrelation", None) or decorrelation_of(config),
        **facts,
    )
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-dbp", description="Decorrelated backpropagation for transformers models."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    merge_parser = commands.add_parser(
        "merge",
        help="fold R into the weights: a plain checkpoint anyone can load",
        description="Fold every decorrelation matrix R of a decorrelated checkpoint into its weights (W <- W R) and "
        "save a plain transformers checkpoint with the same outputs, with its model card. A DBP-MAE one loads with "
        "ViTMAEForPreTraining, ViTModel (the encoder), or as the segmentation backbone; any other with its own "
        "class (e.g. AutoModelForCausalLM); without hf_dbp.",
    )
    merge_parser.add_argument(
        "checkpoint",
        help="a vit_mae_dbp checkpoint, an UperNet fine-tuned with --keep_decorrelation, or one of a model decorrelated with hf_dbp.decorrelate (folder or Hub id)",
    )
    merge_parser.add_argument("output", help="folder for the plain checkpoint")
    push_parser = commands.add_parser(
        "push",
        help="upload a finished output folder to the Hub",
        description="Upload a saved folder (checkpoint, model card with emissions, results) to a Hub model repo, "
        "creating it if needed. Use it after a run saved locally (without --push_to_hub).",
    )
    push_parser.add_argument("folder", help="the run's output folder")
    push_parser.add_argument("repo_id", help="e.g. your-name/dbp-mae-vit-b16")
    push_parser.add_argument("--private", action="store_true", help="create the repo as private")
    push_parser.add_argument("--token", default=None, help="Hub token (default: the one `hf auth login` stored)")
    push_parser.add_argument("--commit_message", default="Upload with hf-dbp")
    args = parser.parse_args(argv)

    try:
        if args.command == "merge":
            print(f"Saved the merged plain checkpoint to {merge(args.checkpoint, args.output)}")
        else:
            from .training.hub import check_model_folder, ensure_hub_reachable, push_folder

            # What is missing here first, before anything about the Hub; the folder to push is always local.
            check_model_folder(args.folder, "folder", repo_id_allowed=False)
            ensure_hub_reachable(
                args.token,
                what="`hf-dbp push`",
                token_option="--token",
                hint=(
                    f"{args.folder} stays saved locally as it is: run `hf-dbp push` again where the Hub can be reached."
                ),
            )
            print(
                push_folder(
                    args.folder,
                    args.repo_id,
                    token=args.token,
                    private=args.private or None,
                    commit_message=args.commit_message,
                )
            )
    except (ValueError, FileNotFoundError, OSError, RuntimeError) as error:
        print(f"hf-dbp {args.command}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
