"""Stage-1 data: sources, BLIP-2 transforms, caption cleaning, collation, a feature cache.

Sources yield raw records ``{"image", "caption", "image_id"}``; ``ImageTextDataset``
turns them into training samples (decoded, transformed image + cleaned caption)
and ``collate_batch`` into batches. Three sources:

- ``SyntheticShapes``: two coloured shapes in a spatial relation, drawn on the fly
  (the embedded default; needs no files).
- ``CaptionJSON``: a COCO/LAVIS caption JSON and an image folder.
- ``WebDatasetShards``: webdataset-style tar shards (``key.jpg`` + ``key.txt``), read
  with ``tarfile``, split across ranks and dataloader workers.

Randomness is a function of ``(seed, epoch, sample)``, never of the worker that
happens to load a sample, so a run gives the same pixels with any ``num_workers``
and a resumed run repeats the data of an uninterrupted one.

Every image becomes RGB through ``to_rgb``: upright by its EXIF orientation, alpha
composited over white, 16-bit greyscale scaled (not clipped) to 8 bits; a mode with
no known correct RGB form (``F``, 32-bit ``I``, ``LAB``) is refused by name.

A corrupt or missing image, or a caption that cleans to nothing, never stops an
epoch: the sample becomes ``None``, the collate drops it and reports how many it
dropped in ``batch["skipped"]``.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import hashlib
import io
import json
import logging
import lzma
import math
import operator
import os
import re
import tarfile
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import ExifTags, Image, ImageDraw, ImageOps
from torch.utils.data import Dataset, IterableDataset, get_worker_info

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "CaptionJSON",
    "FeatureCache",
    "ImageTextDataset",
    "ImageTransform",
    "IterableImageTextDataset",
    "SyntheticShapes",
    "WebDatasetShards",
    "build_transform",
    "clean_caption",
    "collate_batch",
    "expand_urls",
    "load_image",
    "module_fingerprint",
    "random_resized_crop_box",
    "sample_seed",
    "to_rgb",
]

log = logging.getLogger(__name__)

# CLIP's normalisation, which BLIP-2 uses for EVA ViT-g (LAVIS BlipImageBaseProcessor).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_COMPRESSED = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ": lzma.open}  # shards by their first bytes

# What PIL raises for a file that is not a readable image: truncated or garbage
# bytes (OSError, UnidentifiedImageError), broken headers (SyntaxError from some
# plugins, ValueError), absurd sizes (DecompressionBombError).
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


# --------------------------------------------------------------------------- captions

_PUNCTUATION = re.compile(r"[.!\"()*#:;~]")
_SPACE_RUNS = re.compile(r"\s{2,}")


def clean_caption(text: str, max_words: int = 50) -> str:
    """BLIP-2's caption cleaning (LAVIS ``BlipCaptionProcessor.pre_caption``).

    Lowercase; ``. ! " ( ) * # : ; ~`` become spaces (commas, apostrophes, hyphens
    and question marks stay, as in LAVIS); runs of whitespace collapse to one
    space; the ends are trimmed; at most ``max_words`` space-separated words remain.
    """
    if not isinstance(text, str):
        raise ValueError(f"clean_caption expects a str caption, got {type(text).__name__}")
    if max_words < 1:
        raise ValueError(f"max_words must be >= 1, got {max_words}")
    text = _PUNCTUATION.sub(" ", text.lower())
    text = _SPACE_RUNS.sub(" ", text)
    text = text.rstrip("\n").strip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return text


# --------------------------------------------------------------------------- images -> RGB

# 16-bit greyscale. A PNG's "I" (what older Pillow opens a 16-bit grey PNG as) is
# 16-bit too: PNG has no deeper samples.
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
# PIL's own conversion is right for these: CMYK naively (no ICC profile, as in LAVIS and
# Hugging Face), YCbCr as JPEG's full-range BT.601, HSV by the standard hexcone formula.
_AS_PIL = ("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV")
_REFUSED = {
    "F": "float values have no known range (0-1, 0-255, 0-65535 or HDR)",
    "I": "32-bit integer values have no known range (only a PNG's are known to be 16-bit)",
    "LAB": "its white point is not recorded, and Pillow's LAB to RGB differs between versions",
}
_TRANSPOSING_ORIENTATIONS = (2, 3, 4, 5, 6, 7, 8)


def to_rgb(image: Image.Image, name: str | None = None) -> Image.Image:
    """An 8-bit RGB image with the pixels ``image`` shows; ``image`` itself when it already is one.

    Upright by its EXIF orientation; alpha (an alpha band, a transparent palette
    entry or colour) composited over white, as Hugging Face image processors do;
    16-bit greyscale scaled to 8 bits (value / 257, rounded; PIL's own conversion
    clips at 255); 1, L, P, CMYK, YCbCr, HSV and RGBX converted as PIL does. Any
    other mode (F, 32-bit I, LAB) is a one-line ValueError naming the image (``name``,
    default its file name) and the mode. A multi-frame image gives the frame it is
    at (a file opens at its first).
    """
    name = name or getattr(image, "filename", "") or "an in-memory image"
    sixteen_bit = image.mode in _SIXTEEN_BIT or (image.mode == "I" and image.format == "PNG")
    image = _upright(image)  # first: a transposed image has no format, a rebuilt 8-bit one no EXIF
    if sixteen_bit:
        image = _sixteen_to_eight_bits(image, name)
    if image.mode == "La":  # PIL has no La -> RGBA conversion; premultiplied RGBa has one
        grey, alpha = image.split()
        image = Image.merge("RGBa", (grey, grey, grey, alpha))
    if image.mode not in _AS_PIL + _ALPHA_MODES:
        reason = _REFUSED.get(image.mode, "no known conversion to RGB")
        raise ValueError(f"{name}: image mode {image.mode} is refused: {reason}")
    if _has_alpha(image):
        return _over_white(image.convert("RGBA"))
    return image if image.mode == "RGB" else image.convert("RGB")


def _upright(image: Image.Image) -> Image.Image:
    # A phone stores the sensor's pixels and the camera's rotation in EXIF; checking first
    # avoids exif_transpose's copy of every upright image.
    if image.getexif().get(ExifTags.Base.Orientation) in _TRANSPOSING_ORIENTATIONS:
        return ImageOps.exif_transpose(image)
    return image


def _sixteen_to_eight_bits(image: Image.Image, name: str) -> Image.Image:
    """16-bit greyscale -> "L", or "LA" when a grey value is marked transparent (PNG tRNS)."""
    values = np.asarray(image)
    if values.size and (values.min() < 0 or values.max() > 65535):
        raise ValueError(f"{name}: image mode {image.mode} holds values outside 0..65535, so it is not 16-bit")
    # round(v / 257) exactly in integers: 65535 -> 255, 32768 -> 128
    grey = Image.fromarray(((values.astype(np.uint32) + 128) // 257).astype(np.uint8))
    transparent = image.info.get("transparency")
    if not isinstance(transparent, int):
        return grey
    alpha = Image.fromarray(np.where(values == transparent, 0, 255).astype(np.uint8))
    return Image.merge("LA", (grey, alpha))


def _has_alpha(image: Image.Image) -> bool:
    # Image.has_transparency_data, which Pillow 10.0 lacks
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return True
    return image.mode == "P" and image.palette is not None and image.palette.mode.endswith("A")


def _over_white(rgba: Image.Image) -> Image.Image:
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


# --------------------------------------------------------------------------- transforms


def sample_seed(*parts: int | str) -> int:
    """A 63-bit seed derived from ``parts`` (ints or strings), stable across processes and Python runs."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _uniform(generator: torch.Generator | None, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=generator, device="cpu").item()


def _randint(generator: torch.Generator | None, high: int) -> int:
    """Uniform integer in [0, high)."""
    return int(torch.randint(high, (), generator=generator, device="cpu").item())


def random_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None,
) -> tuple[int, int, int, int]:
    """The crop ``(left, top, crop_width, crop_height)`` of RandomResizedCrop.

    Same sampling rule as torchvision: up to ten tries of an area fraction uniform
    in ``scale`` and a log-uniform aspect ratio in ``ratio``; if none fits, the
    largest central crop whose aspect ratio lies in ``ratio``.
    """
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * _uniform(generator, scale[0], scale[1])
        aspect = math.exp(_uniform(generator, log_low, log_high))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = _randint(generator, height - h + 1)
            left = _randint(generator, width - w + 1)
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


class ImageTransform:
    """PIL image -> normalised (3, S, S) float tensor; the BLIP-2 train or eval transform.

    Call it as ``transform(image)`` or ``transform(image, generator=g)``: the crop
    and flip draw from ``g`` when given, else from the transform's own generator
    (seeded by ``seed``), else from torch's global RNG. ``ImageTextDataset`` passes
    a generator seeded per sample, which keeps runs reproducible under any number
    of dataloader workers.
    """

    accepts_generator = True

    def __init__(
        self,
        image_size: int,
        train: bool,
        *,
        scale: tuple[float, float] = (0.5, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        seed: int | None = None,
    ):
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        if not 0 <= hflip <= 1:
            raise ValueError(f"hflip is a probability in [0, 1], got {hflip}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 channels with std > 0, got mean={mean}, std={std}")
        self.image_size = image_size
        self.train = train
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.hflip = hflip
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def __repr__(self) -> str:
        mode = f"train, scale={self.scale}, hflip={self.hflip}" if self.train else "eval"
        return f"ImageTransform({self.image_size}, {mode})"

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            raise ValueError(f"the image transform expects a PIL.Image.Image, got {type(image).__name__}")
        image = to_rgb(image)
        size = (self.image_size, self.image_size)
        if self.train:
            generator = generator if generator is not None else self.generator
            left, top, w, h = random_resized_crop_box(image.width, image.height, self.scale, self.ratio, generator)
            # crop, then resize (not resize(box=...)): the filter sees only the crop, as in torchvision
            image = image.crop((left, top, left + w, top + h)).resize(size, Image.Resampling.BICUBIC)
            # Flipping after the resize touches fewer pixels and gives the same image.
            if self.hflip > 0 and torch.rand((), generator=generator, device="cpu").item() < self.hflip:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            image = image.resize(size, Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        return (pixels.float().div_(255.0) - self.mean) / self.std


def build_transform(image_size: int, train: bool, **kwargs: Any) -> ImageTransform:
    """BLIP-2's image transform (LAVIS ``blip2_image_train`` / ``blip_image_eval``).

    train: RandomResizedCrop(image_size, scale=(0.5, 1.0), bicubic), horizontal flip
    with p=0.5, to tensor, CLIP mean/std. eval: bicubic resize to (image_size,
    image_size), to tensor, CLIP mean/std. ``kwargs`` go to ``ImageTransform``
    (``scale``, ``ratio``, ``hflip``, ``mean``, ``std``, ``seed``).
    """
    return ImageTransform(image_size, train, **kwargs)


# --------------------------------------------------------------------------- synthetic shapes

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (230, 30, 30),
    "green": (30, 190, 40),
    "blue": (40, 70, 235),
    "yellow": (245, 225, 30),
    "purple": (150, 50, 210),
    "orange": (255, 140, 0),
}
# Scenes are stored in one canonical direction; each may be told either way round.
_RELATIONS = {"above": "below", "left of": "right of"}
_INVERSE = {**_RELATIONS, **{v: k for k, v in _RELATIONS.items()}}


@dataclass(frozen=True)
class ShapeSpec:
    shape: str
    colour: str
    cx: float
    cy: float
    radius: float  # half the side of the shape's bounding box


def _noun(spec: ShapeSpec) -> str:
    article = "an" if spec.colour[0] in "aeiou" else "a"
    return f"{article} {spec.colour} {spec.shape}"


@dataclass(frozen=True)
class Scene:
    """What one ``SyntheticShapes`` sample shows and says."""

    first: ShapeSpec  # the object named first in the caption
    second: ShapeSpec
    relation: str  # one of above, below, left of, right of: first <relation> second
    combination: int  # the image_id
    background: tuple[int, int, int]
    caption: str

    @property
    def retold(self) -> str:
        """The caption told the other way round: "a blue square below a red circle" for "a red circle
        above a blue square"."""
        return f"{_noun(self.second)} {_INVERSE[self.relation]} {_noun(self.first)}"


class SyntheticShapes(Dataset):
    """Two coloured shapes in a spatial relation, drawn on the fly; the embedded default data.

    ``4 shapes x 6 colours`` give 24 objects; a scene is an ordered pair of distinct
    objects with a canonical relation (``above`` or ``left of``): 1104 scenes.
    Each sample draws a scene, a layout (sizes, positions, background shade) and a
    phrasing (``"a red circle above a blue square"`` or the same scene told the
    other way round, ``"a blue square below a red circle"``), all from
    ``(seed, index)``: the same arguments give the same sample in any process.

    ``image_id`` is the index of the scene, so samples showing the same scene share
    it (ITC counts them as positives; retrieval treats them as the same image
    content). Train and held-out splits are two instances with different seeds:
    the held-out images are fresh layouts and phrasings.
    """

    shapes = SHAPES
    colours = tuple(COLOURS)

    def __init__(self, n: int, image_size: int = 64, seed: int = 0):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"SyntheticShapes needs n >= 1 samples, got {n!r}")
        if not isinstance(image_size, int) or image_size < 16:
            raise ValueError(f"SyntheticShapes needs image_size >= 16 pixels, got {image_size!r}")
        self.n = n
        self.image_size = image_size
        self.seed = seed
        self.objects = [(shape, colour) for colour in COLOURS for shape in SHAPES]

    @property
    def num_combinations(self) -> int:
        k = len(self.objects)
        return k * (k - 1) * len(_RELATIONS)

    def __len__(self) -> int:
        return self.n

    def _decode(self, combination: int) -> tuple[tuple[str, str], tuple[str, str], str]:
        k = len(self.objects)
        pair, relation = divmod(combination, len(_RELATIONS))
        a, b = divmod(pair, k - 1)
        b += b >= a  # skip the pair of an object with itself
        return self.objects[a], self.objects[b], list(_RELATIONS)[relation]

    def scene(self, index: int) -> Scene:
        """The description of sample ``index`` (what ``__getitem__`` draws and captions)."""
        if not 0 <= index < self.n:
            raise IndexError(f"SyntheticShapes index {index} out of range [0, {self.n})")
        rng = np.random.default_rng([self.seed, index])
        combination = int(rng.integers(self.num_combinations))
        (shape_a, colour_a), (shape_b, colour_b), relation = self._decode(combination)
        s = self.image_size
        radius_a, radius_b = (s * rng.uniform(0.10, 0.17) for _ in range(2))
        # a's centre lies in the first half along the relation's axis, b's in the
        # second, so the shapes never overlap; the other coordinate of b stays
        # within 0.6x the main-axis gap of a's, so the relation is unambiguous.
        main_a = rng.uniform(radius_a + 1, s / 2 - radius_a)
        main_b = rng.uniform(s / 2 + radius_b, s - radius_b - 1)
        cross_a = rng.uniform(radius_a + 1, s - radius_a - 1)
        spread = 0.6 * (main_b - main_a)
        low, high = max(radius_b + 1, cross_a - spread), min(s - radius_b - 1, cross_a + spread)
        cross_b = rng.uniform(low, high)
        if relation == "above":
            a = ShapeSpec(shape_a, colour_a, cross_a, main_a, radius_a)
            b = ShapeSpec(shape_b, colour_b, cross_b, main_b, radius_b)
        else:
            a = ShapeSpec(shape_a, colour_a, main_a, cross_a, radius_a)
            b = ShapeSpec(shape_b, colour_b, main_b, cross_b, radius_b)
        shade = int(rng.integers(20, 90))
        background = (shade, shade, shade)
        if rng.random() < 0.5:
            first, second, told = a, b, relation
        else:
            first, second, told = b, a, _RELATIONS[relation]
        caption = f"{_noun(first)} {told} {_noun(second)}"
        return Scene(first, second, told, combination, background, caption)

    @staticmethod
    def _draw(draw: ImageDraw.ImageDraw, spec: ShapeSpec) -> None:
        x, y, r = spec.cx, spec.cy, spec.radius
        fill = COLOURS[spec.colour]
        if spec.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif spec.shape == "square":
            draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
        elif spec.shape == "triangle":
            # apex up, base at the bottom of the box: the centre (cx, cy) lies inside
            draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
        elif spec.shape == "cross":
            arm = 0.35 * r
            draw.rectangle((x - arm, y - r, x + arm, y + r), fill=fill)
            draw.rectangle((x - r, y - arm, x + r, y + arm), fill=fill)
        else:
            raise ValueError(f"unknown shape {spec.shape!r}; expected one of {SHAPES}")

    def render(self, scene: Scene) -> Image.Image:
        image = Image.new("RGB", (self.image_size, self.image_size), scene.background)
        draw = ImageDraw.Draw(image)
        self._draw(draw, scene.first)
        self._draw(draw, scene.second)
        return image

    def __getitem__(self, index: int) -> dict[str, Any]:
        scene = self.scene(index)
        return {"image": self.render(scene), "caption": scene.caption, "image_id": scene.combination}


# --------------------------------------------------------------------------- caption JSON


def _is_image_id(value: Any) -> bool:
    """A non-empty str or an int. Not a bool or a float: as dict keys True == 1 == 1.0, which would
    silently give two images one id."""
    if isinstance(value, str):
        return bool(value.strip())
    return isinstance(value, int) and not isinstance(value, bool)


def _check_image_id(value: Any, where: str) -> None:
    if not _is_image_id(value):
        raise ValueError(f"{where} has image_id {value!r:.100}; an image id is a non-empty str or an int")


class CaptionJSON(Dataset):
    """COCO/LAVIS caption annotations + an image folder; one sample per caption.

    ``annotation_file`` holds either a list of ``{"image": path relative to
    image_root, "caption": str or list of str, "image_id": optional}`` (LAVIS), or
    COCO's ``{"images": [{"id", "file_name"}], "annotations": [{"image_id",
    "caption"}]}``. Image ids (a non-empty str or an int) map to consecutive ints in
    order of first appearance; an entry without one (or with null) takes the id of
    its image path, so the captions of one image share an id. One image path with
    two different ids is an error, as is any other id (bool, float, list, object).

    Items are ``{"image": Path, "caption": str, "image_id": int}``: images are
    opened by ``ImageTextDataset``, which skips and counts the unreadable ones.
    """

    def __init__(self, annotation_file: str | Path, image_root: str | Path):
        annotation_file, image_root = Path(annotation_file), Path(image_root)
        if not annotation_file.is_file():
            raise FileNotFoundError(f"caption annotation file not found: {annotation_file}")
        if not image_root.is_dir():
            raise FileNotFoundError(f"image root folder not found: {image_root}")
        self.annotation_file = annotation_file
        self.image_root = image_root
        try:
            data = json.loads(annotation_file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{annotation_file}: not valid JSON ({err})") from err
        entries = self._entries(data)
        self.samples: list[tuple[str, str, int]] = []
        ids: dict[Any, int] = {}
        first_id: dict[str, tuple[int, Any]] = {}  # image path -> (entry, image_id given)
        for n, entry in enumerate(entries):
            if not isinstance(entry, Mapping) or entry.get("image") is None or entry.get("caption") is None:
                raise ValueError(
                    f"{annotation_file}: entry {n} must be an object with keys 'image' and 'caption'"
                    f" (optional 'image_id'), got {entry!r:.200}"
                )
            image, captions = entry["image"], entry["caption"]
            captions = [captions] if isinstance(captions, str) else captions
            if not isinstance(image, str) or not image.strip():
                raise ValueError(
                    f"{annotation_file}: entry {n} needs 'image' a non-empty str (a path under the image root),"
                    f" got {image!r:.100}"
                )
            if not isinstance(captions, list) or not captions:
                raise ValueError(f"{annotation_file}: entry {n} needs 'caption' a str or a non-empty list of str")
            if not all(isinstance(c, str) for c in captions):
                raise ValueError(f"{annotation_file}: entry {n} has a caption that is not a str")
            given = entry.get("image_id")
            if given is not None:
                _check_image_id(given, f"{annotation_file}: entry {n}")
            # Captions of one image under two ids would be each other's ITC negatives.
            first, first_given = first_id.setdefault(image, (n, given))
            if first_given != given:
                raise ValueError(
                    f"{annotation_file}: entry {n} gives image {image!r:.100} the image_id {given!r:.60},"
                    f" entry {first} gave it {first_given!r:.60}"
                )
            # absent or null: the image file names the image
            image_id = ids.setdefault(("path", image) if given is None else given, len(ids))
            self.samples.extend((image, c, image_id) for c in captions)
        self.num_images = len(ids)

    def _entries(self, data: Any) -> list[Any]:
        if isinstance(data, list):
            return data
        if isinstance(data, Mapping) and "images" in data and "annotations" in data:
            if not isinstance(data["images"], list) or not isinstance(data["annotations"], list):
                raise ValueError(f"{self.annotation_file}: COCO 'images' and 'annotations' must be lists")
            files = self._coco_files(data["images"])
            out = []
            for n, ann in enumerate(data["annotations"]):
                image_id = ann.get("image_id") if isinstance(ann, Mapping) else None
                _check_image_id(image_id, f"{self.annotation_file}: annotation {n}")
                if image_id not in files:
                    raise ValueError(f"{self.annotation_file}: annotation {n} names an image_id missing from 'images'")
                out.append(
                    {"image": files[ann["image_id"]], "caption": ann.get("caption"), "image_id": ann["image_id"]}
                )
            return out
        raise ValueError(
            f"{self.annotation_file}: expected a JSON list of {{'image', 'caption'}} entries"
            " or a COCO object with 'images' and 'annotations'"
        )

    def _coco_files(self, images: Any) -> dict[Any, Any]:
        """COCO ``images``: id -> file_name; a bad or repeated id is an error."""
        files: dict[Any, Any] = {}
        for n, img in enumerate(images):
            if not isinstance(img, Mapping) or "id" not in img or "file_name" not in img:
                raise ValueError(
                    f"{self.annotation_file}: every COCO 'images' entry needs 'id' and 'file_name' (entry {n})"
                )
            _check_image_id(img["id"], f"{self.annotation_file}: images entry {n}")
            if img["id"] in files:
                raise ValueError(f"{self.annotation_file}: images entry {n} repeats the id {img['id']!r:.100}")
            files[img["id"]] = img["file_name"]
        return files

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, caption, image_id = self.samples[index]
        return {"image": self.image_root / image, "caption": caption, "image_id": image_id}


# --------------------------------------------------------------------------- tar shards


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Shard paths from a list, a brace pattern (``shard-{000..009}.tar``, ``{a,b}``) or a glob."""
    patterns = [urls] if isinstance(urls, (str, os.PathLike)) else list(urls)
    out: list[str] = []
    for pattern in patterns:
        for path in _expand_braces(str(pattern)):
            if any(c in path for c in "*?["):
                matches = sorted(glob.glob(path))
                if not matches:
                    raise FileNotFoundError(f"no tar shard matches {path}")
                out.extend(matches)
            else:
                out.append(path)
    if not out:
        raise ValueError(f"no shards given: {urls!r}")
    return out


def _expand_braces(pattern: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, body, tail = pattern[: match.start()], match.group(1), pattern[match.end() :]
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        lo, hi = span.group(1), span.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [expanded for item in items for expanded in _expand_braces(head + item + tail)]


def _split_key(name: str) -> tuple[str, str]:
    """webdataset naming: the key is the path up to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


class WebDatasetShards(IterableDataset):
    """Samples from webdataset-style tar shards, read with ``tarfile``.

    A sample is the group of consecutive members sharing a key: an image
    (``key.jpg``/``.jpeg``/``.png``/``.webp``), a caption (``key.txt``) and
    optionally ``key.json`` with an ``image_id`` (an int is used as is, a str is
    hashed, so the captions of one image share it across shards). Without one, the
    id is a stable 63-bit hash of the shard name and key (one id per sample). Items are
    ``{"image": bytes or None, "caption": str or None, "image_id": int, "key": str}``,
    plus ``"error": str`` for a sample whose caption is not UTF-8 or whose json or
    its ``image_id`` (a non-empty str or an int) is bad; such samples, and those
    missing an image or caption, are left for ``ImageTextDataset`` to skip and count.

    Splitting (``split``): ``"shard"`` gives shards round-robin to the
    ``world_size * num_workers`` readers (rank-major): no shard is read twice,
    but ranks get unequal shares when shards differ in size. ``"sample"`` has
    every reader open every shard and keep every ``world_size * num_workers``-th
    sample: shares equal to one sample, at the cost of reading all the bytes on
    every reader. ``"auto"`` (default) is ``"shard"`` when there are at least as
    many shards as readers, else ``"sample"``. ``shuffle`` reorders shards per
    epoch (``set_epoch``; the same order on every reader) and, with
    ``shuffle_buffer > 0``, samples within a buffer.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        shuffle_buffer: int = 0,
        seed: int = 0,
        split: str = "auto",
    ):
        if split not in ("auto", "shard", "sample"):
            raise ValueError(f"split must be 'auto', 'shard' or 'sample', got {split!r}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.urls = expand_urls(urls)
        for url in self.urls:
            if not Path(url).is_file():
                raise FileNotFoundError(f"tar shard not found: {url}")
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.shuffle_buffer, self.seed = shuffle, shuffle_buffer, seed
        self.split = split
        self.epoch = 0
        self.shard_errors = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _reader(self) -> tuple[int, int]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return self.rank * workers + worker, self.world_size * workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        reader, readers = self._reader()
        urls = list(self.urls)
        if self.shuffle:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch))
            urls = [urls[i] for i in torch.randperm(len(urls), generator=generator, device="cpu").tolist()]
        if self.split == "shard" or (self.split == "auto" and len(urls) >= readers):
            stream = (s for url in urls[reader::readers] for s in self._read_shard(url))
        else:
            every = (s for url in urls for s in self._read_shard(url))
            stream = (s for n, s in enumerate(every) if n % readers == reader)
        if self.shuffle and self.shuffle_buffer > 0:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, reader))
            stream = self._buffer_shuffle(stream, generator)
        yield from stream

    def _buffer_shuffle(self, stream: Iterator[dict[str, Any]], generator: torch.Generator) -> Iterator[dict[str, Any]]:
        buffer: list[dict[str, Any]] = []
        for sample in stream:
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                i = _randint(generator, len(buffer))
                buffer[i], buffer[-1] = buffer[-1], buffer[i]
                yield buffer.pop()
        while buffer:
            i = _randint(generator, len(buffer))
            buffer[i], buffer[-1] = buffer[-1], buffer[i]
            yield buffer.pop()

    def _read_shard(self, url: str) -> Iterator[dict[str, Any]]:
        shard = Path(url).name
        group: dict[str, bytes] = {}
        key: str | None = None
        try:
            with open(url, "rb") as raw:
                magic = raw.read(6)
            # decompressed by its format's module, which (unlike tarfile's own) raises EOFError on a stream cut short
            opener = next((o for m, o in _COMPRESSED.items() if magic.startswith(m)), open)
            with opener(url, "rb") as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    member_key, ext = _split_key(member.name)
                    if key is not None and member_key != key:
                        yield self._sample(shard, key, group)
                        group = {}
                    key = member_key
                    handle = tar.extractfile(member)
                    data = handle.read() if handle is not None else b""
                    if len(data) != member.size:
                        raise tarfile.ReadError(f"{member.name}: {len(data)} of {member.size} bytes")
                    group[ext] = data
                # tarfile reads a header cut short as the end of the archive: a plain tar that really ends
                # has its two zero blocks after the last member, a compressed one the end of its stream
                if opener is open and tar.offset + 2 * tarfile.BLOCKSIZE > os.path.getsize(url):
                    raise tarfile.ReadError("no end-of-archive marker: the file is truncated")
                while stream.read(1 << 20):  # the padding after the end marker, up to the end of the stream
                    pass
        except (tarfile.TarError, OSError, EOFError) as err:
            # A damaged shard ends early; its intact samples are kept.
            self.shard_errors += 1
            log.warning("tar shard %s is damaged after key %r (%s); moving on", url, key, err)
        if key is not None:
            yield self._sample(shard, key, group)

    @staticmethod
    def _sample(shard: str, key: str, group: dict[str, bytes]) -> dict[str, Any]:
        image = next((group[ext] for ext in IMAGE_EXTENSIONS if ext in group), None)
        caption, caption_problem = WebDatasetShards._caption(key, group)
        image_id, id_problem = WebDatasetShards._image_id(shard, key, group)
        sample = {"image": image, "caption": caption, "image_id": image_id, "key": f"{shard}/{key}"}
        if caption_problem or id_problem:
            sample["error"] = caption_problem or id_problem
        return sample

    @staticmethod
    def _caption(key: str, group: dict[str, bytes]) -> tuple[str | None, str | None]:
        """(caption or None, what is wrong with it or None)."""
        for ext in ("txt", "caption", "text"):
            if ext in group:
                try:
                    return group[ext].decode("utf-8").strip(), None
                except UnicodeDecodeError:  # replacement characters would be trained as text
                    return None, f"{key}.{ext} is not UTF-8 text"
        return None, None

    @staticmethod
    def _image_id(shard: str, key: str, group: dict[str, bytes]) -> tuple[int, str | None]:
        """(image id, what is wrong with the json's image_id or None); a broken id falls back to the sample's."""
        own = sample_seed("sample", shard, key)
        if "json" not in group:
            return own, None
        try:
            meta = json.loads(group["json"])
        except ValueError:  # also UnicodeDecodeError
            return own, f"{key}.json is not valid JSON"
        if not isinstance(meta, dict):
            return own, f"{key}.json is not a JSON object"
        raw = meta.get("image_id")
        if raw is None:
            return own, None
        if not _is_image_id(raw):
            return own, f"{key}.json has image_id {raw!r:.60}; an image id is a non-empty str or an int"
        # a str (e.g. "coco_391895") is hashed, so its captions share it across shards
        return (sample_seed("image_id", raw) if isinstance(raw, str) else raw), None


# --------------------------------------------------------------------------- samples and batches


def load_image(image: Image.Image | str | os.PathLike | bytes, name: str | None = None) -> Image.Image:
    """A fully decoded RGB PIL image (``to_rgb``) from a PIL image, a path or encoded bytes.

    ``name`` names the image in errors (default: its path or file name). PIL's errors
    for unreadable files propagate; a mode with no correct RGB form is a ValueError.
    """
    if isinstance(image, Image.Image):
        return to_rgb(image, name)
    if not isinstance(image, (bytes, bytearray, str, os.PathLike)):
        raise ValueError(f"an image must be a PIL image, a path or bytes, got {type(image).__name__}")
    name = name or _name_of(image, "image bytes")
    if isinstance(image, (str, os.PathLike)) and not Path(image).is_file():
        raise FileNotFoundError(f"{name}: no such image file")
    try:
        opened = Image.open(io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image)
        with opened:
            # PIL decodes lazily: load() here makes a truncated file fail now, not mid-batch.
            opened.load()
            rgb = to_rgb(opened, name)
            # closing a file's image frees its pixels: what is returned must be a copy
            return opened.copy() if rgb is opened else rgb
    except IMAGE_ERRORS as err:
        if str(err).startswith(name):  # to_rgb's refusals name it already
            raise
        raise ValueError(f"{name}: not a readable image ({err})") from err


def _name_of(image: Any, fallback: str) -> str:
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    return getattr(image, "filename", "") or fallback


def check_images(images: Any) -> None:
    """``images`` must be a non-empty list (or other sequence) of PIL images, paths or encoded bytes."""
    if isinstance(images, (str, bytes, os.PathLike)) or not isinstance(images, Sequence) or not images:
        raise ValueError(f"images must be a non-empty list of PIL images, paths or bytes, got {type(images).__name__}")


def load_pixels(images: Sequence[Any], transform: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor:
    """(B, 3, S, S): PIL images, paths or encoded bytes, each decoded and put through ``transform``."""
    check_images(images)
    return torch.stack([transform(load_image(im, _name_of(im, f"images[{i}]"))) for i, im in enumerate(images)])


class _ImageText:
    """What the map-style and the iterable ``ImageTextDataset`` share: loading, skipping, transforming."""

    def __init__(
        self,
        source: Dataset | IterableDataset,
        transform: Callable[..., torch.Tensor],
        max_words: int = 50,
        *,
        seed: int = 0,
    ):
        if not callable(transform):
            raise ValueError(f"transform must be callable (see build_transform), got {type(transform).__name__}")
        if max_words < 1:
            raise ValueError(f"max_words must be >= 1, got {max_words}")
        self.source = source
        self.transform = transform
        self.max_words = max_words
        self.seed = seed
        self.epoch = 0
        self.skipped = 0
        self.skipped_names: list[str] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(epoch)

    def _skip(self, name: str, reason: str) -> None:
        self.skipped += 1
        if len(self.skipped_names) < 100:
            self.skipped_names.append(name)
        log.warning("skipping sample %s: %s", name, reason)

    def _make(self, record: Mapping[str, Any], index: int, rng_key: int | str) -> dict[str, Any] | None:
        image, caption = record.get("image"), record.get("caption")
        name = str(record.get("key", image if isinstance(image, (str, os.PathLike)) else index))
        if record.get("error"):
            self._skip(name, str(record["error"]))
            return None
        if caption is None:
            self._skip(name, "no caption")
            return None
        if not isinstance(caption, str):
            raise ValueError(f"sample {name}: a caption must be a str, got {type(caption).__name__}")
        cleaned = clean_caption(caption, self.max_words)
        if not cleaned:  # "", "...", "!!!": empty text would be trained as a caption
            self._skip(name, f"caption {caption!r:.60} is empty after cleaning")
            return None
        if image is None:
            self._skip(name, "no image")
            return None
        image_id = _int_id(record.get("image_id", index))
        if image_id is None:
            raise ValueError(f"sample {name}: image_id must be an int, got {record.get('image_id')!r:.60}")
        try:
            image = load_image(image, name)
        except FileNotFoundError:
            self._skip(name, "image file not found")
            return None
        except IMAGE_ERRORS as err:
            self._skip(name, f"unreadable image ({type(err).__name__}: {err})")
            return None
        if getattr(self.transform, "accepts_generator", False):
            generator = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, rng_key))
            pixels = self.transform(image, generator=generator)
        else:
            pixels = self.transform(image)
        return {"pixels": pixels, "caption": cleaned, "image_id": image_id, "index": index}


def _int_id(value: Any) -> int | None:
    """``value`` as an int if it is one (numpy and torch ints too), else None: int() would truncate 1.5,
    parse "12" and take True for 1."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


class ImageTextDataset(_ImageText, Dataset):
    """Training samples from a source: decoded, transformed image and cleaned caption.

    Items are ``{"pixels": (3, S, S) float, "caption": str, "image_id": int,
    "index": int}``, or ``None`` for a sample whose image is missing or unreadable,
    that has no caption or one that cleans to nothing ("", "...", "!!!"), or that
    its source marks broken (``"error"``): such samples are counted in ``skipped``
    (per process: with ``num_workers > 0`` read ``batch["skipped"]``) and their
    names kept in ``skipped_names`` (first 100). A caption that is not a str or an
    ``image_id`` that is not an int is a ValueError (a bug in the source, not in
    the data). For an iterable source (``WebDatasetShards``) the result is iterable
    too, with ``index`` -1 and the ``None`` placeholders yielded in place so that
    the collate still counts them.

    The transform draws its randomness from a generator seeded by ``(seed, epoch,
    index)`` (the tar key for shards); call ``set_epoch`` at each epoch (before the
    loader starts its workers: persistent workers keep the epoch they copied).
    """

    def __new__(cls, source: Any = None, *args: Any, **kwargs: Any):  # default: unpickling calls __new__(cls)
        if cls is ImageTextDataset and isinstance(source, IterableDataset):
            # A separate class, so that a stream has no __len__ (loaders test hasattr(ds, "__len__")).
            return IterableImageTextDataset(source, *args, **kwargs)
        return super().__new__(cls)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        return self._make(self.source[index], index, index)


class IterableImageTextDataset(_ImageText, IterableDataset):
    """``ImageTextDataset`` over an iterable source (what ``ImageTextDataset(shards, ...)`` returns)."""

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        for record in self.source:
            yield self._make(record, -1, record.get("key", ""))


def collate_batch(
    samples: Sequence[dict[str, Any] | None], tokenizer: Any, max_length: int = 32
) -> dict[str, torch.Tensor | list[str] | int]:
    """Batch ``ImageTextDataset`` samples; ``None`` samples are dropped and counted.

    Returns ``pixels`` (B, 3, S, S) float, ``input_ids`` (B, T) int64 and
    ``attention_mask`` (B, T) bool (padding to the longest caption, truncation to
    ``max_length``), ``image_ids`` (B,) int64, ``indices`` (B,) int64 (dataset
    index, -1 for streamed samples), ``captions`` list[str], ``skipped`` int. If
    every sample was dropped, B is 0 (``pixels`` is (0, 3, 0, 0)): skip that step.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (room for [CLS] and [SEP]), got {max_length}")
    kept = [s for s in samples if s is not None]
    skipped = len(samples) - len(kept)
    if not kept:
        return {
            "pixels": torch.empty(0, 3, 0, 0),
            "input_ids": torch.empty(0, 0, dtype=torch.int64),
            "attention_mask": torch.empty(0, 0, dtype=torch.bool),
            "image_ids": torch.empty(0, dtype=torch.int64),
            "indices": torch.empty(0, dtype=torch.int64),
            "captions": [],
            "skipped": skipped,
        }
    shapes = {tuple(s["pixels"].shape) for s in kept}
    if len(shapes) != 1:
        raise ValueError(f"collate_batch needs images of one shape (3, S, S), got {sorted(shapes)}")
    captions = [s["caption"] for s in kept]
    tokens = tokenizer(captions, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
    return {
        "pixels": torch.stack([s["pixels"] for s in kept]),
        "input_ids": tokens["input_ids"].to(torch.int64),
        "attention_mask": tokens["attention_mask"].bool(),
        "image_ids": torch.tensor([s["image_id"] for s in kept], dtype=torch.int64),
        "indices": torch.tensor([s.get("index", -1) for s in kept], dtype=torch.int64),
        "captions": captions,
        "skipped": skipped,
    }


# --------------------------------------------------------------------------- feature cache


def module_fingerprint(module: torch.nn.Module) -> str:
    """SHA-256 over a module's parameter and buffer names, shapes, dtypes and values."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class FeatureCache:
    """Frozen-encoder features, computed once per sample index, memory-mapped on disk.

    Only valid when a sample's pixels never change, i.e. with the eval transform
    (augmentation off). ``cache(indices, pixels)`` returns (B, *feature_shape)
    fp16 features on CPU: cached rows are read from the map, missing ones come
    from ``encoder(pixels[missing])`` (under no_grad) and are stored. Values always
    come back through fp16, so the first epoch sees the same numbers as later ones.

    Files: ``path`` (a ``.npy`` of shape (num_samples, *feature_shape), fp16) and
    ``path + ".json"`` (shape, dtype, fingerprint). ``fingerprint`` should name
    everything the features depend on (encoder weights, e.g. ``module_fingerprint``,
    image size, transform, data source); a stored cache is used only if its
    sidecar matches, otherwise it is recomputed, never silently reused. The map
    is built in a temporary file and moved into place (``os.replace``) once every
    index is filled, after the old sidecar is removed, so a crash never leaves a
    sidecar describing other features. Progress short of a full pass is not kept
    across runs (its temporary file is removed with the cache object). With
    several ranks, give each rank its own ``path`` unless all ranks read the same
    indices.
    """

    def __init__(
        self,
        path: str | Path,
        num_samples: int,
        encoder: Callable[[torch.Tensor], torch.Tensor],
        fingerprint: str | Mapping[str, Any],
    ):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        path = Path(path)
        if path.suffix != ".npy":
            raise ValueError(f"the feature cache path must end in .npy, got {path}")
        self.path = path
        self.sidecar = path.with_name(path.name + ".json")
        self.num_samples = num_samples
        self.encoder = encoder
        meta = fingerprint if isinstance(fingerprint, str) else json.dumps(fingerprint, sort_keys=True, default=str)
        self.fingerprint = hashlib.sha256(f"{meta}|num_samples={num_samples}".encode()).hexdigest()
        self.encoder_calls = 0
        self._tmp: Path | None = None
        self._filled: np.ndarray | None = None
        self._array: np.ndarray | None = self._open_existing()

    @property
    def complete(self) -> bool:
        """Whether every index is stored in the final file."""
        return self._filled is None and self._array is not None

    def _open_existing(self) -> np.ndarray | None:
        if not (self.path.is_file() and self.sidecar.is_file()):
            return None
        try:
            meta = json.loads(self.sidecar.read_text())
            array = np.load(self.path, mmap_mode="r")
        except (OSError, ValueError) as err:
            log.warning("feature cache %s unreadable (%s); recomputing", self.path, err)
            return None
        if meta.get("fingerprint") != self.fingerprint:
            log.info("feature cache %s was made with another encoder/config; recomputing", self.path)
            return None
        if list(array.shape) != meta.get("shape") or array.dtype != np.float16 or array.shape[0] != self.num_samples:
            log.warning("feature cache %s does not match its sidecar; recomputing", self.path)
            return None
        return array

    def _start(self, feature_shape: tuple[int, ...]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f"{self.path.stem}.tmp-{os.getpid()}-{id(self):x}.npy")
        self._array = np.lib.format.open_memmap(
            self._tmp, mode="w+", dtype=np.float16, shape=(self.num_samples, *feature_shape)
        )
        self._filled = np.zeros(self.num_samples, dtype=bool)
        # An unfinished pass is not resumable: its file goes when the cache does (or at exit).
        weakref.finalize(self, self._tmp.unlink, missing_ok=True)

    def _finish(self) -> None:
        assert self._array is not None and self._tmp is not None
        shape = list(self._array.shape)
        self._array.flush()
        self._array = None  # close the map before moving its file
        self.sidecar.unlink(missing_ok=True)
        os.replace(self._tmp, self.path)
        tmp_sidecar = self.sidecar.with_name(f"{self.sidecar.name}.tmp-{os.getpid()}")
        tmp_sidecar.write_text(json.dumps({"shape": shape, "dtype": "float16", "fingerprint": self.fingerprint}))
        os.replace(tmp_sidecar, self.sidecar)
        self._tmp, self._filled = None, None
        self._array = np.load(self.path, mmap_mode="r")

    def __call__(self, indices: torch.Tensor | Sequence[int], pixels: torch.Tensor | None) -> torch.Tensor:
        idx = torch.as_tensor(indices, dtype=torch.int64).cpu().numpy()
        if idx.ndim != 1:
            raise ValueError(f"indices must be 1-D (B,), got shape {tuple(idx.shape)}")
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_samples):
            raise ValueError(f"indices must lie in [0, {self.num_samples}) (dataset indices), got {idx.tolist()}")
        missing = np.arange(idx.size) if self._array is None else np.zeros(0, dtype=np.int64)
        if self._filled is not None:
            missing = np.nonzero(~self._filled[idx])[0]
        if missing.size:
            if pixels is None:
                raise ValueError("the feature cache lacks some indices: pass their pixels (B, 3, S, S)")
            if pixels.shape[0] != idx.size:
                raise ValueError(f"pixels must have one row per index: {pixels.shape[0]} rows for {idx.size} indices")
            with torch.no_grad():
                feats = self.encoder(pixels[torch.as_tensor(missing, device=pixels.device)])
            self.encoder_calls += 1
            feats = feats.detach().to("cpu", torch.float16).numpy()
            if self._array is None:
                self._start(tuple(feats.shape[1:]))
            if tuple(feats.shape[1:]) != self._array.shape[1:] or feats.shape[0] != missing.size:
                raise ValueError(
                    f"the encoder returned features of shape {feats.shape}, expected ({missing.size}, "
                    f"{', '.join(map(str, self._array.shape[1:]))})"
                )
            self._array[idx[missing]] = feats
            self._filled[idx[missing]] = True
            if self._filled.all():
                self._finish()
        return torch.from_numpy(np.array(self._array[idx]))


def write_shapes(folder: str | Path, n: int, image_size: int = 64, seed: int = 1234) -> dict[str, str]:
    """``n`` synthetic scenes as ``<folder>/<i>.png`` and their captions as ``<folder>/captions.json``
    (``{"0.png": caption, ...}``): images of what the embedded default trains on, from a seed its training
    split does not use. Returns the captions."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = SyntheticShapes(n, image_size=image_size, seed=seed)
    captions = {}
    for i in range(n):
        sample = shapes[i]
        sample["image"].save(folder / f"{i}.png")
        captions[f"{i}.png"] = sample["caption"]
    (folder / "captions.json").write_text(json.dumps(captions, indent=1))
    return captions


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m blip2_fast.data", description="Write synthetic scenes of the embedded default to a folder."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    shapes = sub.add_parser("shapes", help="<folder>/<i>.png and <folder>/captions.json")
    shapes.add_argument("folder")
    shapes.add_argument("--n", type=int, default=8)
    shapes.add_argument("--image-size", type=int, default=64)
    shapes.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    captions = write_shapes(args.folder, args.n, args.image_size, args.seed)
    print(f"wrote {len(captions)} images and captions.json to {args.folder}")


if __name__ == "__main__":
    from blip2_fast.cli import run_main

    run_main(main)
