"""The code a saved ViTMAE-DBP checkpoint carries, so that plain transformers loads it with `trust_remote_code=True`.

transformers saves a class registered with `register_for_auto_class` by copying its module and the modules it imports
relatively *from the same folder* (`custom_object_save`), and loads remote code as one flat folder. Our modeling files
import the model-independent core from another package (`hf_dbp.core.decorrelation`), which that copy cannot follow.
So our classes are not registered that way (`_remote_code_auto_class` names their Auto class) and save their code here: every module they need, found by following their relative imports
through the package, written side by side with the imports rewritten to siblings (`from ...core.decorrelation import`
becomes `from .decorrelation import`). Run from such a flat copy (a model loaded as remote code and saved again), the
same code writes the same files.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path
from typing import Any

from transformers import PreTrainedConfig

# `from .x import y`, `from ...core.x import y` and `from . import x`, at any indentation (as transformers reads them).
_RELATIVE_IMPORT = re.compile(r"^(\s*)from\s+(\.+)([\w.]*)\s+import\s+(.*)$", flags=re.MULTILINE)
# What `save_pretrained(..., push_to_hub=True)` hands on to the push.
_PUSH_KWARGS = ("repo_id", "commit_message", "commit_description", "private", "token", "create_pr", "revision", "tags")


def _resolve(package: str, dots: str, name: str) -> str:
    base = package.split(".")
    if len(dots) > 1:
        base = base[: len(base) - (len(dots) - 1)]
    return ".".join([*base, name] if name else base)


def module_files(module_name: str) -> dict[str, str]:
    """`{file name: flat source}` for `module_name` and every module it imports relatively, recursively."""
    files: dict[str, str] = {}
    origins: dict[str, str] = {}
    pending = [module_name]
    while pending:
        name = pending.pop()
        module = sys.modules.get(name) or importlib.import_module(name)
        file_name = Path(module.__file__).name
        if file_name in files:
            if origins[file_name] != name:
                raise ValueError(f"remote code needs two modules named {file_name}: {origins[file_name]} and {name}")
            continue
        package = module.__package__ or name.rpartition(".")[0]

        def flat(match: re.Match, package: str = package) -> str:
            indent, dots, target, names = match.groups()
            if not target:  # `from . import x`: x is a module of that package
                pending.extend(_resolve(package, dots, n.strip()) for n in names.split(","))
                return f"{indent}from . import {names}"
            pending.append(_resolve(package, dots, target))
            return f"{indent}from .{target.rpartition('.')[2]} import {names}"

        files[file_name] = _RELATIVE_IMPORT.sub(flat, Path(module.__file__).read_text(encoding="utf-8"))
        origins[file_name] = name
    return files


def remote_code_auto_class(cls: type) -> str | None:
    """The Auto class under which `cls` saves its code: set on each of our classes itself, never inherited (a user's
    subclass lives in the user's package, which a checkpoint cannot carry: it saves like a subclass of any
    transformers model). Classes loaded as remote code save theirs through transformers (flat already)."""
    return cls.__dict__.get("_remote_code_auto_class") if cls._auto_class is None else None


def write_remote_code(obj: Any, folder: str | os.PathLike, config: PreTrainedConfig) -> list[Path]:
    """Write the code of `obj`'s class, flat, into `folder`, and name the class in `config.auto_map`."""
    cls = type(obj)
    module = cls.__module__
    os.makedirs(folder, exist_ok=True)
    written = []
    for file_name, source in module_files(module).items():
        path = Path(folder) / file_name
        path.write_text(source, encoding="utf-8")
        written.append(path)
    entry = {remote_code_auto_class(cls): f"{module.rpartition('.')[2]}.{cls.__name__}"}
    config.auto_map = {**(getattr(config, "auto_map", None) or {}), **entry}
    return written


def save_pretrained_with_remote_code(obj: Any, save_pretrained, save_directory: str | os.PathLike, **kwargs):
    """`save_pretrained` of transformers (the bound `super()` method) for our config and model classes.

    Our classes (see `remote_code_auto_class`) write their code with `write_remote_code` before transformers saves.
    A push with `push_to_hub=True` goes through `push_to_hub`, which uploads every file: the one of `save_pretrained`
    uploads only the files written after it started, and ours come first, so that `config.json` names them.
    """
    if remote_code_auto_class(type(obj)) is None or not kwargs.get("is_main_process", True):
        return save_pretrained(save_directory, **kwargs)
    if kwargs.pop("push_to_hub", False):
        hub = {key: kwargs.pop(key) for key in _PUSH_KWARGS if key in kwargs}
        save_pretrained_with_remote_code(obj, save_pretrained, save_directory, **kwargs)
        repo_id = hub.pop("repo_id", os.path.basename(os.path.normpath(save_directory)))
        return obj.push_to_hub(repo_id, **hub)
    write_remote_code(obj, save_directory, obj if isinstance(obj, PreTrainedConfig) else obj.config)
    return save_pretrained(save_directory, **kwargs)
