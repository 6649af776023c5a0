"""ADE20K (MIT SceneParsing): its 150 classes and loading an extracted `ADEChallengeData2016` folder.

The classes: in the order the model sees them after label reduction. Raw ADE20K annotations use 0 for "other
objects" and 1..150 for the classes. hf-dbp reduces labels exactly once, in the data transform (0 -> 255 = ignored,
k -> k - 1), so class index `i` here is raw label `i + 1`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from datasets import Dataset, DatasetDict, Features, Image

logger = logging.getLogger(__name__)


# Copied verbatim from the Hugging Face label file `ade20k-id2label.json` in the dataset repository
# `huggingface/label-files` (https://huggingface.co/datasets/huggingface/label-files/blob/main/ade20k-id2label.json),
# which is also the `id2label` of https://huggingface.co/nvidia/segformer-b0-finetuned-ade-512-512/blob/main/config.json
# (and the other `nvidia/segformer-*-finetuned-ade-512-512` and ADE20K UperNet configs). The list was transcribed from
# copies of that id2label in public GitHub code (three independent copies, one citing the segformer-b0 config.json,
# agreeing entry for entry), not written from memory. Note that entry 7 is "bed " WITH a trailing space in that
# file; it is kept verbatim so that names match label2id of Hub checkpoints.
ADE20K_CLASSES: tuple[str, ...] = (
    "wall",
    "building",
    "sky",
    "floor",
    "tree",
    "ceiling",
    "road",
    "bed ",
    "windowpane",
    "grass",
    "cabinet",
    "sidewalk",
    "person",
    "earth",
    "door",
    "table",
    "mountain",
    "plant",
    "curtain",
    "chair",
    "car",
    "water",
    "painting",
    "sofa",
    "shelf",
    "house",
    "sea",
    "mirror",
    "rug",
    "field",
    "armchair",
    "seat",
    "fence",
    "desk",
    "rock",
    "wardrobe",
    "lamp",
    "bathtub",
    "railing",
    "cushion",
    "base",
    "box",
    "column",
    "signboard",
    "chest of drawers",
    "counter",
    "sand",
    "sink",
    "skyscraper",
    "fireplace",
    "refrigerator",
    "grandstand",
    "path",
    "stairs",
    "runway",
    "case",
    "pool table",
    "pillow",
    "screen door",
    "stairway",
    "river",
    "bridge",
    "bookcase",
    "blind",
    "coffee table",
    "toilet",
    "flower",
    "book",
    "hill",
    "bench",
    "countertop",
    "stove",
    "palm",
    "kitchen island",
    "computer",
    "swivel chair",
    "boat",
    "bar",
    "arcade machine",
    "hovel",
    "bus",
    "towel",
    "light",
    "truck",
    "tower",
    "chandelier",
    "awning",
    "streetlight",
    "booth",
    "television receiver",
    "airplane",
    "dirt track",
    "apparel",
    "pole",
    "land",
    "bannister",
    "escalator",
    "ottoman",
    "bottle",
    "buffet",
    "poster",
    "stage",
    "van",
    "ship",
    "fountain",
    "conveyer belt",
    "canopy",
    "washer",
    "plaything",
    "swimming pool",
    "stool",
    "barrel",
    "basket",
    "waterfall",
    "tent",
    "bag",
    "minibike",
    "cradle",
    "oven",
    "ball",
    "food",
    "step",
    "tank",
    "trade name",
    "microwave",
    "pot",
    "animal",
    "bicycle",
    "lake",
    "dishwasher",
    "screen",
    "blanket",
    "sculpture",
    "hood",
    "sconce",
    "vase",
    "traffic light",
    "tray",
    "ashcan",
    "fan",
    "pier",
    "crt screen",
    "plate",
    "monitor",
    "bulletin board",
    "shower",
    "radiator",
    "glass",
    "clock",
    "flag",
)

ADE20K_NUM_LABELS: int = len(ADE20K_CLASSES)
"""Number of ADE20K classes after label reduction (150); label 255 marks ignored pixels."""


def ade20k_id2label() -> dict[int, str]:
    """Map each reduced ADE20K class index (0..149) to its name, e.g. `{0: "wall", ..., 149: "flag"}`.

    A fresh dict each call, suitable for `config.id2label`.
    """
    return dict(enumerate(ADE20K_CLASSES))


def ade20k_label2id() -> dict[str, int]:
    """Map each ADE20K class name to its reduced class index (0..149), the inverse of [`ade20k_id2label`].

    Names are verbatim from the Hub label file, so the key for class 7 is `"bed "` (with a trailing space).
    """
    return {name: index for index, name in enumerate(ADE20K_CLASSES)}


ADE20K_SPLITS = {"train": "training", "validation": "validation"}
"""Our split name -> the ADEChallengeData2016 sub-folder name."""

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
ANNOTATION_SUFFIXES = (".png",)


def _list_files(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    """stem -> path of the files in `folder` with one of `suffixes`; the second file of a stem is reported, skipped."""
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        # "._name.jpg" are macOS resource forks that zip files made on a Mac carry: not images.
        if not path.is_file() or path.name.startswith(".") or path.suffix.lower() not in suffixes:
            continue
        if path.stem in files:
            logger.warning("skipping %s: %s has the same name stem", path, files[path.stem])
            continue
        files[path.stem] = path
    return files


def _found_folders(root: Path) -> list[str]:
    """The folders under `root`, two levels deep, for an error message."""
    found = []
    for child in sorted(root.iterdir()):
        if child.is_dir():
            found.append(child.name + "/")
            found.extend(
                f"{child.name}/{grandchild.name}/" for grandchild in sorted(child.iterdir()) if grandchild.is_dir()
            )
    return found


def load_ade20k_folder(data_dir: str) -> DatasetDict:
    """Load an extracted ADEChallengeData2016 folder as a `DatasetDict` with splits `train` and `validation`.

    Args:
        data_dir: the ADEChallengeData2016 folder (holding `images/{training,validation}/*.jpg` and
            `annotations/{training,validation}/*.png`), or the folder it was extracted into.

    Returns:
        Splits `train` and `validation`, each with `datasets.Image()` columns `image` and `annotation` that hold the
        files' paths: images are decoded when a row is read, not here. Rows are sorted by file name.

    An image and an annotation are a pair when their file names have the same stem. A file without its partner is
    skipped with a warning naming it (and the count is logged). A folder without the expected sub-folders raises
    `FileNotFoundError` saying what was expected and what was found.
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"ADE20K folder {str(root)!r} does not exist or is not a folder")
    if not (root / "images").is_dir() and (root / "ADEChallengeData2016").is_dir():
        root = root / "ADEChallengeData2016"  # the folder the zip file was extracted into
    expected = [f"{kind}/{folder}" for kind in ("images", "annotations") for folder in ADE20K_SPLITS.values()]
    missing = [sub for sub in expected if not (root / sub).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{str(root)!r} is not an extracted ADEChallengeData2016 folder: expected the sub-folders "
            f"{', '.join(expected)}; missing {', '.join(missing)}; found {_found_folders(root) or 'no sub-folders'}"
        )

    features = Features({"image": Image(), "annotation": Image()})
    splits = {}
    for split, folder in ADE20K_SPLITS.items():
        images = _list_files(root / "images" / folder, IMAGE_SUFFIXES)
        annotations = _list_files(root / "annotations" / folder, ANNOTATION_SUFFIXES)
        for stem in sorted(images.keys() - annotations.keys()):
            logger.warning(
                "skipping image %s: it has no annotation %s.png", images[stem], root / "annotations" / folder / stem
            )
        for stem in sorted(annotations.keys() - images.keys()):
            logger.warning(
                "skipping annotation %s: it has no image %s.jpg", annotations[stem], root / "images" / folder / stem
            )
        unpaired = len(images.keys() ^ annotations.keys())
        if unpaired:
            logger.warning("%s: skipped %d file(s) without a partner", split, unpaired)
        stems = sorted(images.keys() & annotations.keys())
        if not stems:
            raise FileNotFoundError(
                f"no image/annotation pairs in {root / 'images' / folder} and {root / 'annotations' / folder} "
                f"({len(images)} image(s) with suffix {'/'.join(IMAGE_SUFFIXES)}, {len(annotations)} .png annotation(s))"
            )
        # Paths, not decoded images: `Image().encode_example(str)` stores {"path": ..., "bytes": None}.
        columns = {
            "image": [str(images[stem].resolve()) for stem in stems],
            "annotation": [str(annotations[stem].resolve()) for stem in stems],
        }
        splits[split] = Dataset.from_dict(columns, features=features)
        logger.info("%s: %d image/annotation pairs from %s", split, len(stems), root)
    return DatasetDict(splits)


__all__ = ["ADE20K_CLASSES", "ADE20K_SPLITS", "load_ade20k_folder"]
