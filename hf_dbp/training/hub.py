"""Publishing to the Hugging Face Hub: a reachability check before training, and pushing a finished folder."""

from __future__ import annotations

import os
import re

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import LocalTokenNotFoundError

from .model_card import is_repo_id, write_model_card


class HubUnreachableError(RuntimeError):
    """The Hub cannot be used for pushing: offline, unreachable, or not logged in."""


LOCAL_HINT = (
    "Leave --push_to_hub off to save everything locally, then push the finished folder later with "
    "`hf-dbp push OUTPUT_DIR REPO_ID`."
)


def ensure_hub_reachable(
    token: str | None = None, what: str = "--push_to_hub", token_option: str = "--hub_token", hint: str = LOCAL_HINT
) -> str:
    """Check, in a second, that pushing can work; returns the user name. Raises `HubUnreachableError` otherwise.

    Called before training when `--push_to_hub` is set, so a run does not train for hours and then fail to upload.
    The error names `what` needs the Hub, the option that passes a token, and `hint`: what to do instead.
    """
    if constants.HF_HUB_OFFLINE:
        raise HubUnreachableError(f"{what} needs the Hugging Face Hub, but HF_HUB_OFFLINE is set. {hint}")
    try:
        return HfApi().whoami(token=token)["name"]
    except LocalTokenNotFoundError as error:
        raise HubUnreachableError(
            f"{what} needs a Hugging Face token: run `hf auth login` or pass {token_option}. {hint}"
        ) from error
    except Exception as error:  # noqa: BLE001 - httpx, OS and HTTP errors all mean the same thing here
        raise HubUnreachableError(
            f"{what} needs the Hugging Face Hub, which cannot be reached ({type(error).__name__}: {error}). {hint}"
        ) from error


def check_model_folder(path: str, role: str, repo_id_allowed: bool = True) -> None:
    """Raise a `FileNotFoundError` naming `path` (as the `role` it plays) unless it is a folder holding a saved model
    (`config.json`), or, with `repo_id_allowed`, a name that may be a Hub repo id (the Hub is asked later). Local
    problems are reported before anything about the Hub."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(
                f"{role} {path} holds no saved model (no config.json in it: {sorted(os.listdir(path))[:8]})"
            )
    elif os.path.exists(path):
        raise FileNotFoundError(f"{role} {path} is a file, not a saved model folder")
    elif not (repo_id_allowed and is_repo_id(path)):
        raise FileNotFoundError(f"{role} {path}: no such folder (from {os.getcwd()})")


def push_folder(
    folder: str,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload with hf-dbp",
    api: HfApi | None = None,
) -> str:
    """Upload a saved model folder (checkpoint, model card, results, emissions) to a Hub model repo.

    The folder must hold a model (`config.json`); a model card is written first if it has none, and the loading code
    of an hf-dbp card (the folder's path) is made to name the repo id. Intermediate
    `checkpoint-*` folders stay behind. Returns the URL of the commit.
    """
    check_model_folder(folder, "folder", repo_id_allowed=False)
    card = os.path.join(folder, "README.md")
    if not os.path.isfile(card):
        # AutoConfig knows hf-dbp's config types already: importing this module ran hf_dbp/__init__.py, which
        # registers them (a lower layer must not import the package's front, which imports every layer).
        from transformers import AutoConfig

        write_model_card(folder, AutoConfig.from_pretrained(folder), model_name=repo_id)
    else:
        # hf-dbp's cards load from the folder's absolute path (`from_pretrained("/...")`, `load_decorrelated(Auto...,
        # "/...")`); on the Hub that is the repo id. Any absolute path in such a call, not only this folder's: a
        # folder moved or copied after its run names where it was written. Relative paths (a user's own card, say
        # `from_pretrained("./my_tokenizer")`) are left alone.
        with open(card, encoding="utf-8") as file:
            text = file.read()
        rewritten = re.sub(
            r'((?:from_pretrained\(|load_decorrelated\(\s*\w+\s*,)\s*)"([^"]+)"',
            lambda m: f'{m.group(1)}"{repo_id}"' if os.path.isabs(m.group(2)) else m.group(0),
            text,
        )
        if rewritten != text:
            with open(card, "w", encoding="utf-8") as file:
                file.write(rewritten)
    api = api or HfApi()
    api.create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(
        folder_path=folder,
        repo_id=repo_id,
        token=token,
        commit_message=commit_message,
        ignore_patterns=["checkpoint-*", "checkpoint-*/**", "*.lock"],
    )
    return getattr(commit, "commit_url", str(commit))


def checkpoint_not_found(name: str, flag: str, error: OSError) -> OSError:
    """The error to raise when `from_pretrained(name)` failed: what is missing locally, and the Hub's answer in one
    line (transformers' own message does not name the checkpoint)."""
    if os.path.exists(name):
        return error  # a local folder that does not load: transformers' message is about its files
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return OSError(
        f"{flag} {name}: no such folder here (from {os.getcwd()}), and the Hub gave no model of that id: {first}"
    )
