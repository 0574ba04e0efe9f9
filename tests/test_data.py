import bz2
import gc
import gzip
import io
import json
import lzma
import math
import re
import tarfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image
from torch.utils.data import DataLoader

from blip2_fast.data import (
    COLOURS,
    CaptionJSON,
    FeatureCache,
    ImageTextDataset,
    SyntheticShapes,
    WebDatasetShards,
    build_transform,
    clean_caption,
    collate_batch,
    expand_urls,
    load_image,
    module_fingerprint,
    random_resized_crop_box,
)
from blip2_fast.text import load_tokenizer

# CLIP's normalisation written out: the spec, not the module's constants.
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


def random_image(seed: int, size=(40, 30)) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


def unnormalise(pixels: torch.Tensor) -> torch.Tensor:
    return pixels * STD + MEAN


# --------------------------------------------------------------------------- captions


@pytest.mark.parametrize(
    "raw, cleaned",
    [
        ("A Man riding a HORSE.", "a man riding a horse"),
        ("  Two dogs (playing)  with a ball!!  ", "two dogs playing with a ball"),
        ('The dog\'s "toy": a ball; #fun *now* ~ok', "the dog's toy a ball fun now ok"),
        # LAVIS keeps commas, question marks, hyphens and slashes.
        ("Is it a half-eaten pizza, or cake/pie?", "is it a half-eaten pizza, or cake/pie?"),
        ("a cat on a mat.\n", "a cat on a mat"),
        ("...", ""),
    ],
)
def test_clean_caption_examples(raw, cleaned):
    assert clean_caption(raw) == cleaned


def test_clean_caption_truncates_to_max_words():
    text = " ".join(f"w{i}" for i in range(60))
    assert clean_caption(text).split(" ") == [f"w{i}" for i in range(50)]
    assert clean_caption("One. Two! Three (four)", max_words=3) == "one two three"
    with pytest.raises(ValueError, match="str caption"):
        clean_caption(["a list"])


# --------------------------------------------------------------------------- transforms


def test_eval_transform_is_resize_to_tensor_and_clip_normalise():
    image = random_image(0)
    out = build_transform(24, train=False)(image)
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    resized = np.array(image.resize((24, 24), Image.Resampling.BICUBIC))
    expected = torch.from_numpy(resized).permute(2, 0, 1) / 255
    torch.testing.assert_close(unnormalise(out), expected.float(), atol=1e-6, rtol=0)
    # A flat colour maps to exactly (c / 255 - mean) / std per channel.
    flat = build_transform(16, train=False)(Image.new("RGB", (20, 20), (255, 128, 0)))
    want = (torch.tensor([255, 128, 0]) / 255 - MEAN.flatten()) / STD.flatten()
    torch.testing.assert_close(flat.mean(dim=(1, 2)), want, atol=1e-5, rtol=0)
    assert flat.std(dim=(1, 2)).max() < 1e-5
    # Greyscale inputs become 3 channels.
    assert build_transform(16, train=False)(Image.new("L", (20, 20), 7)).shape == (3, 16, 16)


def test_train_transform_is_seeded_and_random():
    image = random_image(1, size=(48, 40))
    transform = build_transform(32, train=True)
    a = transform(image, generator=torch.Generator().manual_seed(3))
    b = transform(image, generator=torch.Generator().manual_seed(3))
    c = transform(image, generator=torch.Generator().manual_seed(4))
    assert a.shape == (3, 32, 32)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    # A transform's own seed makes a reproducible stream.
    s1, s2 = build_transform(32, train=True, seed=7), build_transform(32, train=True, seed=7)
    assert all(torch.equal(s1(image), s2(image)) for _ in range(3))


def test_train_transform_crops_then_resizes_bicubic():
    # torchvision's RandomResizedCrop on PIL: crop the box, then resize it; the filter never sees outside the box.
    image = random_image(2, size=(50, 40))
    out = build_transform(20, train=True, hflip=0.0)(image, generator=torch.Generator().manual_seed(9))
    left, top, w, h = random_resized_crop_box(50, 40, (0.5, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(9))
    assert (w, h) != (50, 40)
    crop = np.array(image.crop((left, top, left + w, top + h)).resize((20, 20), Image.Resampling.BICUBIC))
    expected = torch.from_numpy(crop).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(unnormalise(out), expected, atol=1e-6, rtol=0)


def test_random_resized_crop_box_respects_scale_and_ratio():
    g = torch.Generator().manual_seed(0)
    areas = []
    for _ in range(300):
        left, top, w, h = random_resized_crop_box(150, 120, (0.5, 1.0), (3 / 4, 4 / 3), g)
        assert 0 <= left and left + w <= 150 and 0 <= top and top + h <= 120
        areas.append(w * h / (150 * 120))
        # rounding w and h to pixels moves the ratio by at most ~1%
        assert 3 / 4 * 0.98 <= w / h <= 4 / 3 * 1.02
    assert 0.49 <= min(areas) and max(areas) <= 1.01
    assert min(areas) < 0.6 and max(areas) > 0.9  # the whole range is used
    # A very wide image falls back to the largest central crop within the ratio.
    left, top, w, h = random_resized_crop_box(1000, 10, (0.99, 1.0), (1.0, 1.0), g)
    assert (w, h, top) == (10, 10, 0) and left == 495


def test_train_flip_happens_about_half_the_time():
    image = Image.new("RGB", (32, 32), (255, 0, 0))
    image.paste((0, 0, 255), (16, 0, 32, 32))  # left red, right blue
    no_flip = build_transform(32, train=True, hflip=0.0)
    always = build_transform(32, train=True, hflip=1.0)
    default = build_transform(32, train=True)
    flips = 0
    for seed in range(40):
        kept = no_flip(image, generator=torch.Generator().manual_seed(seed))
        flipped = always(image, generator=torch.Generator().manual_seed(seed))
        # same crop, mirrored: the flip draws after the crop
        assert torch.equal(flipped, kept.flip(-1))
        out = default(image, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(out, kept) or torch.equal(out, flipped)
        flips += torch.equal(out, flipped)
    assert 8 <= flips <= 32, flips


def test_bad_transform_arguments():
    with pytest.raises(ValueError, match="image_size"):
        build_transform(0, train=True)
    with pytest.raises(ValueError, match="scale"):
        build_transform(32, train=True, scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="PIL.Image.Image"):
        build_transform(32, train=False)(torch.zeros(3, 8, 8))


# --------------------------------------------------------------------------- image modes -> RGB

WHITE, RED, GREEN, BLUE = (255, 255, 255), (255, 0, 0), (0, 255, 0), (0, 0, 255)
CORNERS = [(0, 0), (1, 0), (0, 1), (1, 1)]  # the pixels of a 2x2 image, row-major


def at_corners(rgbs: list) -> dict:
    return dict(zip(CORNERS, rgbs, strict=True))


def grey(*values: int) -> list[tuple[int, int, int]]:
    return [(v, v, v) for v in values]


def image_of(mode: str, values: list, size=(2, 2), **info) -> Image.Image:
    """An image of ``mode`` holding ``values`` (row-major); P and PA get the palette red, green, blue."""
    image = Image.new(mode, size)
    if mode in ("P", "PA"):
        image.putpalette([*RED, *GREEN, *BLUE])
    image.putdata(values)
    image.info.update(info)
    return image


def sixteen_bit(mode: str, values: list[int], **info) -> Image.Image:
    dtype = {"I;16": "<u2", "I;16L": "<u2", "I;16B": ">u2"}[mode]
    image = Image.frombytes(mode, (2, 2), np.array(values, dtype=dtype).tobytes())
    image.info.update(info)
    return image


def png_int(values: list[int]) -> Image.Image:
    """What older Pillow opens a 16-bit grey PNG as: mode I, format PNG."""
    image = Image.fromarray(np.array(values, dtype=np.int32).reshape(2, 2))
    image.format = "PNG"
    return image


def rgba_palette() -> Image.Image:
    image = Image.new("P", (2, 2))
    image.putpalette([*RED, 0, *GREEN, 128, *BLUE, 255], "RGBA")
    image.putdata([0, 1, 2, 2])
    return image


def rgb_pixels(image: Image.Image) -> list[tuple[int, ...]]:
    assert image.mode == "RGB"
    return [tuple(p) for p in np.asarray(image).reshape(-1, 3).tolist()]


def tensor_pixels(pixels: torch.Tensor) -> list[tuple[int, ...]]:
    values = (unnormalise(pixels) * 255).round().to(torch.uint8).permute(1, 2, 0).reshape(-1, 3)
    return [tuple(p) for p in values.tolist()]


# The expected pixels are the spec: alpha a over white is c*a/255 + 255*(1 - a/255), rounded; 16-bit v
# becomes round(v / 257); CMYK is (255 - c)(255 - k)/255, rounded.
MODE_CASES = [
    pytest.param(lambda: sixteen_bit("I;16", [0, 32768, 65535, 257]), grey(0, 128, 255, 1), id="I;16"),
    pytest.param(lambda: sixteen_bit("I;16B", [65535, 1000, 128, 384]), grey(255, 4, 0, 1), id="I;16B"),
    pytest.param(lambda: sixteen_bit("I;16L", [32767, 65534, 129, 771]), grey(127, 255, 1, 3), id="I;16L"),
    pytest.param(lambda: png_int([0, 32768, 65535, 257]), grey(0, 128, 255, 1), id="I-of-a-PNG"),
    pytest.param(
        lambda: sixteen_bit("I;16", [1000, 65535, 0, 32768], transparency=1000),
        [WHITE, *grey(255, 0, 128)],
        id="I;16-transparent-grey",
    ),
    pytest.param(
        lambda: image_of("RGBA", [(255, 0, 0, 0), (255, 0, 0, 128), (10, 20, 30, 255), (0, 0, 0, 0)]),
        [WHITE, (255, 127, 127), (10, 20, 30), WHITE],
        id="RGBA",
    ),
    pytest.param(
        lambda: image_of("RGBa", [(0, 0, 0, 0), (128, 0, 0, 128), (10, 20, 30, 255), (0, 0, 0, 0)]),
        [WHITE, (255, 127, 127), (10, 20, 30), WHITE],
        id="RGBa-premultiplied",
    ),
    pytest.param(lambda: image_of("LA", [(100, 0), (100, 128), (100, 255), (0, 0)]), grey(255, 177, 100, 255), id="LA"),
    pytest.param(lambda: image_of("La", [(0, 0), (50, 128), (100, 255), (0, 0)]), grey(255, 177, 100, 255), id="La"),
    pytest.param(
        lambda: image_of("PA", [(0, 0), (1, 128), (2, 255), (0, 255)]),
        [WHITE, (127, 255, 127), BLUE, RED],
        id="PA",
    ),
    pytest.param(
        lambda: image_of("P", [0, 1, 2, 0], transparency=0), [WHITE, GREEN, BLUE, WHITE], id="P-transparent-entry"
    ),
    pytest.param(
        lambda: image_of("P", [0, 1, 2, 0], transparency=bytes([0, 128, 255])),
        [WHITE, (127, 255, 127), BLUE, WHITE],
        id="P-alpha-per-entry",
    ),
    pytest.param(rgba_palette, [WHITE, (127, 255, 127), BLUE, BLUE], id="P-RGBA-palette"),
    pytest.param(lambda: image_of("L", [7, 9, 7, 200], transparency=7), grey(255, 9, 255, 200), id="L-transparent"),
    pytest.param(
        lambda: image_of("RGB", [(1, 2, 3), (4, 5, 6), (1, 2, 3), (1, 2, 4)], transparency=(1, 2, 3)),
        [WHITE, (4, 5, 6), WHITE, (1, 2, 4)],
        id="RGB-transparent",
    ),
    pytest.param(lambda: image_of("1", [0, 255, 0, 255], transparency=0), [WHITE] * 4, id="1-transparent"),
    # As PIL converts them.
    pytest.param(lambda: image_of("L", [0, 7, 128, 255]), grey(0, 7, 128, 255), id="L"),
    pytest.param(lambda: image_of("1", [0, 255, 255, 0]), grey(0, 255, 255, 0), id="1"),
    pytest.param(lambda: image_of("P", [0, 1, 2, 0]), [RED, GREEN, BLUE, RED], id="P"),
    pytest.param(
        lambda: image_of("RGBX", [(1, 2, 3, 0), (4, 5, 6, 9), (7, 8, 9, 0), (0, 0, 0, 255)]),
        [(1, 2, 3), (4, 5, 6), (7, 8, 9), (0, 0, 0)],
        id="RGBX",
    ),
    pytest.param(
        lambda: image_of("CMYK", [(255, 0, 0, 0), (0, 0, 0, 128), (0, 0, 0, 0), (0, 200, 100, 50)]),
        [(0, 255, 255), (127, 127, 127), WHITE, (205, 44, 125)],
        id="CMYK",
    ),
    pytest.param(
        lambda: image_of("YCbCr", [(128, 128, 128), (255, 128, 128), (0, 128, 128), (128, 128, 128)]),
        grey(128, 255, 0, 128),
        id="YCbCr",
    ),
    pytest.param(
        lambda: image_of("HSV", [(0, 255, 255), (85, 255, 255), (170, 255, 255), (0, 0, 128)]),
        [RED, GREEN, BLUE, (128, 128, 128)],
        id="HSV",
    ),
]


@pytest.mark.parametrize("make, expected", MODE_CASES)
def test_every_image_mode_reaches_the_model_as_rgb(make, expected):
    assert rgb_pixels(load_image(make())) == expected
    # The transform converts a PIL image it is given the same way; at the image's own size its
    # resize is the identity, so the pixels come back exactly.
    assert tensor_pixels(build_transform(2, train=False)(make())) == expected


@pytest.mark.parametrize("mode", ["F", "I", "LAB"])
def test_modes_without_a_known_rgb_form_are_refused_by_name(tmp_path, mode):
    image = Image.new(mode, (2, 2))
    with pytest.raises(ValueError, match=rf"^shard-3\.tar/k7: image mode {mode} is refused: ") as err:
        load_image(image, "shard-3.tar/k7")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=rf"^an in-memory image: image mode {mode} is refused"):
        build_transform(2, train=False)(image)
    # From a file the error names the file; in training the sample is skipped, counted and named.
    path = tmp_path / f"{mode}.tif"
    image.save(path)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: image mode {mode} is refused"):
        load_image(path)
    (tmp_path / "ann.json").write_text(json.dumps([{"image": path.name, "caption": "a picture"}]))
    dataset = ImageTextDataset(CaptionJSON(tmp_path / "ann.json", tmp_path), build_transform(2, train=False))
    assert dataset[0] is None and dataset.skipped == 1 and dataset.skipped_names == [str(path)]


def test_a_png_int_image_beyond_16_bits_is_refused():
    with pytest.raises(ValueError, match="mode I holds values outside 0..65535"):
        load_image(png_int([0, 1, 2, 70000]))


def quadrants(mode: str, size: tuple[int, int], colours: list) -> Image.Image:
    """``colours`` in the top-left, top-right, bottom-left, bottom-right quarters."""
    image = Image.new(mode, size)
    w, h = size[0] // 2, size[1] // 2
    for (x, y), colour in zip([(0, 0), (w, 0), (0, h), (w, h)], colours, strict=True):
        image.paste(colour, (x, y, x + w, y + h))
    return image


def write_mode_files(root: Path) -> dict[str, tuple[tuple[int, int], dict, int]]:
    """Files whose modes need care: name -> (size, {(x, y): expected RGB}, tolerance). PNG and GIF are
    exact; JPEG is lossy, a level or two even at quality 100 on flat 8x8 blocks."""
    root.mkdir(parents=True, exist_ok=True)
    sixteen_bit("I;16", [0, 32768, 65535, 257]).save(root / "grey16.png")
    sixteen_bit("I;16", [1000, 65535, 0, 32768], transparency=1000).save(root / "grey16-transparent.png")
    image_of("P", [0, 1, 2, 0], transparency=bytes([0, 128, 255])).save(root / "palette.png")
    image_of("RGBA", [(255, 0, 0, 0), (255, 0, 0, 128), (10, 20, 30, 255), (0, 0, 0, 0)]).save(root / "rgba.png")
    cmyk = [(255, 0, 0, 0), (0, 0, 0, 128), (0, 0, 0, 0), (0, 200, 100, 50)]
    quadrants("CMYK", (16, 16), cmyk).save(root / "cmyk.jpg", quality=100)
    # A phone photo held upright: stored as the sensor saw it (32x16), EXIF orientation 6, "rotate 90
    # degrees clockwise to view". Clockwise, the stored top-left quarter ends at the top right.
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    stored = quadrants("RGB", (32, 16), [RED, BLUE, GREEN, (255, 255, 0)])
    stored.save(root / "rotated.jpg", quality=100, subsampling=0, exif=exif.tobytes())
    # Two frames: the first is the image; its palette entry 0 is transparent.
    first, second = image_of("P", [0, 1, 2, 0]), image_of("P", [1, 1, 1, 1])
    first.save(root / "frames.gif", save_all=True, append_images=[second], transparency=0, optimize=False)
    return {
        "grey16.png": ((2, 2), at_corners(grey(0, 128, 255, 1)), 0),
        "grey16-transparent.png": ((2, 2), at_corners([WHITE, *grey(255, 0, 128)]), 0),
        "palette.png": ((2, 2), at_corners([WHITE, (127, 255, 127), BLUE, WHITE]), 0),
        "rgba.png": ((2, 2), at_corners([WHITE, (255, 127, 127), (10, 20, 30), WHITE]), 0),
        "cmyk.jpg": (
            (16, 16),
            {(4, 4): (0, 255, 255), (12, 4): (127,) * 3, (4, 12): WHITE, (12, 12): (205, 44, 125)},
            2,
        ),
        "rotated.jpg": ((16, 32), {(12, 8): RED, (4, 8): GREEN, (12, 24): BLUE, (4, 24): (255, 255, 0)}, 2),
        "frames.gif": ((2, 2), at_corners([WHITE, GREEN, BLUE, WHITE]), 0),
    }


def test_image_files_reach_the_model_as_rgb_on_every_path(tmp_path):
    root = tmp_path / "images"
    specs = write_mode_files(root)

    def check(pixels: np.ndarray, name: str) -> None:
        size, expected, tolerance = specs[name]
        assert pixels.shape == (size[1], size[0], 3), name
        for (x, y), rgb in expected.items():
            assert np.abs(pixels[y, x].astype(int) - rgb).max() <= tolerance, (name, (x, y), pixels[y, x], rgb)

    for name in specs:
        check(np.asarray(load_image(root / name)), name)

    # What the transform receives on the training paths: CaptionJSON and a tar shard through ImageTextDataset.
    def seen(image):
        return torch.from_numpy(np.asarray(image).copy())

    (tmp_path / "ann.json").write_text(json.dumps([{"image": name, "caption": "a picture"} for name in specs]))
    dataset = ImageTextDataset(CaptionJSON(tmp_path / "ann.json", root), seen)
    for i, name in enumerate(specs):
        check(dataset[i]["pixels"].numpy(), name)
    in_shard = [name for name in specs if name.endswith((".png", ".jpg"))]  # what the shard reader takes
    members = []
    for i, name in enumerate(in_shard):
        members += [(f"k{i}.{name.rsplit('.', 1)[1]}", (root / name).read_bytes()), (f"k{i}.txt", b"a picture")]
    write_shard(tmp_path / "s.tar", members)
    samples = list(ImageTextDataset(WebDatasetShards(str(tmp_path / "s.tar")), seen))
    for sample, name in zip(samples, in_shard, strict=True):
        check(sample["pixels"].numpy(), name)
    # And through the real eval transform (at the image's size its resize is the identity).
    real = ImageTextDataset(CaptionJSON(tmp_path / "ann.json", root), build_transform(2, train=False))
    assert tensor_pixels(real[0]["pixels"]) == grey(0, 128, 255, 1)
    assert dataset.skipped == real.skipped == 0


def test_multi_frame_files_give_their_first_frame(tmp_path):
    path = tmp_path / "pages.tif"
    Image.new("RGB", (2, 2), RED).save(path, save_all=True, append_images=[Image.new("RGB", (2, 2), BLUE)])
    assert rgb_pixels(load_image(path)) == [RED] * 4
    assert rgb_pixels(load_image(path.read_bytes())) == [RED] * 4


# --------------------------------------------------------------------------- synthetic shapes

# Fraction of its bounding box each shape fills, with room for pixel rounding at small sizes
FILL = {"square": (0.97, 1.01), "circle": (0.68, 0.9), "cross": (0.45, 0.75), "triangle": (0.4, 0.62)}
CAPTION = re.compile(r"an? (\w+) (\w+) (above|below|left of|right of) an? (\w+) (\w+)")


def test_synthetic_shapes_are_deterministic_per_seed_and_index():
    a, b, other = SyntheticShapes(50, 48, seed=1), SyntheticShapes(50, 48, seed=1), SyntheticShapes(50, 48, seed=2)
    for i in (0, 7, 49):
        x, y = a[i], b[i]
        assert x["caption"] == y["caption"] and x["image_id"] == y["image_id"]
        assert x["image"].mode == "RGB" and x["image"].size == (48, 48)
        assert x["image"].tobytes() == y["image"].tobytes()
    assert [a[i]["caption"] for i in range(20)] != [other[i]["caption"] for i in range(20)]
    with pytest.raises(IndexError):
        a[50]


def test_synthetic_captions_match_the_pixels():
    ds = SyntheticShapes(120, 64, seed=0)
    checked_centroids = 0
    for i in range(len(ds)):
        sample, scene = ds[i], ds.scene(i)
        colour1, shape1, relation, colour2, shape2 = CAPTION.fullmatch(sample["caption"]).groups()
        assert (colour1, shape1, colour2, shape2) == (
            scene.first.colour,
            scene.first.shape,
            scene.second.colour,
            scene.second.shape,
        )
        assert relation == scene.relation and sample["image_id"] == scene.combination
        pixels = np.asarray(sample["image"]).astype(int)
        for spec, colour in ((scene.first, colour1), (scene.second, colour2)):
            assert tuple(pixels[int(spec.cy), int(spec.cx)]) == COLOURS[colour], (i, sample["caption"])
        dx, dy = scene.second.cx - scene.first.cx, scene.second.cy - scene.first.cy
        told = {"above": dy > abs(dx), "below": -dy > abs(dx), "left of": dx > abs(dy), "right of": -dx > abs(dy)}
        assert told[relation], (i, sample["caption"], dx, dy)
        if colour1 != colour2:
            # Independent of scene(): where each caption colour actually is in the image.
            ys1, xs1 = np.nonzero((pixels == COLOURS[colour1]).all(-1))
            ys2, xs2 = np.nonzero((pixels == COLOURS[colour2]).all(-1))
            mx, my = xs2.mean() - xs1.mean(), ys2.mean() - ys1.mean()
            told = {"above": my > 0, "below": my < 0, "left of": mx > 0, "right of": mx < 0}
            assert told[relation], (i, sample["caption"])
            # Shapes by how much of their bounding box they fill.
            for spec, ys, xs in ((scene.first, ys1, xs1), (scene.second, ys2, xs2)):
                box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
                fill = len(ys) / box
                lo, hi = FILL[spec.shape]
                assert lo <= fill <= hi, (i, spec, fill)
                if spec.shape == "triangle":  # apex up: the bottom row is wider than the top row
                    assert (ys == ys.max()).sum() > 3 * (ys == ys.min()).sum()
                # On the diagonal at 0.6 of the radius: inside a circle, outside a cross's arms.
                diagonal = tuple(pixels[int(spec.cy + 0.6 * spec.radius), int(spec.cx + 0.6 * spec.radius)])
                if spec.shape in ("circle", "cross"):
                    assert (diagonal == COLOURS[spec.colour]) == (spec.shape == "circle"), (i, spec)
            checked_centroids += 1
    assert checked_centroids > 80


def test_synthetic_shapes_have_many_combinations_and_shared_ids():
    ds = SyntheticShapes(1500, 32, seed=0)
    assert ds.num_combinations == 24 * 23 * 2
    scenes = [ds.scene(i) for i in range(len(ds))]
    assert len({s.combination for s in scenes}) > 700
    assert {s.relation for s in scenes} == {"above", "below", "left of", "right of"}
    # Samples sharing an id show the same two objects in the same arrangement, maybe told the other way round.
    by_id = {}
    for s in scenes:
        canon = {"below": "above", "right of": "left of"}
        a, b = (s.first, s.second) if s.relation in ("above", "left of") else (s.second, s.first)
        key = ((a.shape, a.colour), (b.shape, b.colour), canon.get(s.relation, s.relation))
        assert by_id.setdefault(s.combination, key) == key
    assert any(sum(s.combination == c for s in scenes) > 1 for c in by_id)


# --------------------------------------------------------------------------- caption JSON and skipping


def write_images(root: Path) -> list[dict]:
    """Two real images (PNG, JPEG), a garbage .jpg, a truncated JPEG, and one missing file."""
    root.mkdir(parents=True, exist_ok=True)
    random_image(10).save(root / "a.png")
    (root / "sub").mkdir()
    random_image(11).save(root / "sub" / "b.jpg", quality=95)
    (root / "garbage.jpg").write_bytes(b"not an image at all" * 20)
    buf = io.BytesIO()
    random_image(12, size=(64, 64)).save(buf, format="JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return [
        {"image": "a.png", "caption": ["A Red  thing.", "Another (caption)!"], "image_id": "img-a"},
        {"image": "sub/b.jpg", "caption": "B: a JPEG", "image_id": 7},
        {"image": "garbage.jpg", "caption": "garbage"},
        {"image": "truncated.jpg", "caption": "truncated"},
        {"image": "missing.png", "caption": "missing"},
    ]


def test_caption_json_reads_real_files_and_skips_bad_ones(tmp_path, tokenizer):
    entries = write_images(tmp_path / "images")
    entries[2]["image_id"] = entries[3]["image_id"] = None  # null is no id: the file names the image
    (tmp_path / "ann.json").write_text(json.dumps(entries))
    source = CaptionJSON(tmp_path / "ann.json", tmp_path / "images")
    assert len(source) == 6 and source.num_images == 5
    assert [source[i]["image_id"] for i in range(6)] == [0, 0, 1, 2, 3, 4]
    dataset = ImageTextDataset(source, build_transform(16, train=False))
    samples = [dataset[i] for i in range(len(dataset))]
    assert [s is None for s in samples] == [False, False, False, True, True, True]
    assert dataset.skipped == 3
    assert [Path(n).name for n in dataset.skipped_names] == ["garbage.jpg", "truncated.jpg", "missing.png"]
    assert samples[0]["caption"] == "a red thing" and samples[1]["caption"] == "another caption"
    with Image.open(tmp_path / "images" / "sub" / "b.jpg") as jpeg:
        expected = build_transform(16, train=False)(jpeg.convert("RGB"))
    assert torch.equal(samples[2]["pixels"], expected)

    loader = DataLoader(dataset, batch_size=4, collate_fn=partial(collate_batch, tokenizer=tokenizer))
    batches = list(loader)
    assert [b["skipped"] for b in batches] == [1, 2]
    assert sum(len(b["captions"]) for b in batches) == 3
    assert batches[0]["pixels"].shape == (3, 3, 16, 16)
    assert batches[0]["image_ids"].tolist() == [0, 0, 1] and batches[0]["indices"].tolist() == [0, 1, 2]


def test_caption_json_errors_name_the_problem(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CaptionJSON(tmp_path / "nope.json", tmp_path / "images")
    (tmp_path / "ann.json").write_text(json.dumps([{"image": "a.png", "caption": "x"}]))
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        CaptionJSON(tmp_path / "ann.json", tmp_path / "no_such_dir")
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "a.png", "text": "x"}]))
    with pytest.raises(ValueError, match="entry 0 .*'caption'"):
        CaptionJSON(tmp_path / "bad.json", tmp_path / "images")
    (tmp_path / "bad_id.json").write_text(json.dumps([{"image": "a.png", "caption": "x", "image_id": [1]}]))
    with pytest.raises(ValueError, match=r"entry 0 has image_id \[1\]"):
        CaptionJSON(tmp_path / "bad_id.json", tmp_path / "images")
    (tmp_path / "notjson.json").write_text("{oops")
    with pytest.raises(ValueError, match="not valid JSON"):
        CaptionJSON(tmp_path / "notjson.json", tmp_path / "images")


def test_caption_json_reads_coco_format(tmp_path):
    (tmp_path / "images").mkdir()
    coco = {
        "images": [{"id": 42, "file_name": "x.jpg"}, {"id": 5, "file_name": "y.jpg"}],
        "annotations": [
            {"image_id": 5, "caption": "y one"},
            {"image_id": 42, "caption": "x one"},
            {"image_id": 5, "caption": "y two"},
        ],
    }
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    source = CaptionJSON(tmp_path / "coco.json", tmp_path / "images")
    assert [(s["image"].name, s["image_id"]) for s in (source[i] for i in range(3))] == [
        ("y.jpg", 0),
        ("x.jpg", 1),
        ("y.jpg", 0),
    ]


# LAVIS's cleaning leaves nothing of these: whitespace and the punctuation it drops.
EMPTY_CAPTIONS = ["", "   ", "!!!", "...", " . ; : ~ ", "\n\t", '"()"', "*#*"]
BAD_IMAGE_IDS = [True, False, 1.5, 2.0, [1], {"id": 1}, "", "   "]


def test_captions_that_clean_to_nothing_are_skipped_on_every_source(tmp_path, tokenizer):
    assert all(clean_caption(c) == "" for c in EMPTY_CAPTIONS)
    (tmp_path / "images").mkdir()
    path = tmp_path / "images" / "a.png"
    random_image(5).save(path)
    captions = ["A good one.", *EMPTY_CAPTIONS]
    (tmp_path / "ann.json").write_text(json.dumps([{"image": "a.png", "caption": captions}]))
    dataset = ImageTextDataset(CaptionJSON(tmp_path / "ann.json", tmp_path / "images"), build_transform(8, False))
    samples = [dataset[i] for i in range(len(dataset))]
    assert samples[0]["caption"] == "a good one" and samples[1:] == [None] * len(EMPTY_CAPTIONS)
    assert dataset.skipped == len(EMPTY_CAPTIONS) and dataset.skipped_names == [str(path)] * len(EMPTY_CAPTIONS)
    batch = collate_batch(samples, tokenizer)
    assert batch["skipped"] == len(EMPTY_CAPTIONS) and batch["captions"] == ["a good one"]
    # Tar shards: one sample per caption.
    members = [m for i, c in enumerate(captions) for m in ((f"k{i}.png", path.read_bytes()), (f"k{i}.txt", c.encode()))]
    write_shard(tmp_path / "s.tar", members)
    stream = ImageTextDataset(WebDatasetShards(str(tmp_path / "s.tar")), build_transform(8, False))
    samples = list(stream)
    assert samples[0]["caption"] == "a good one" and samples[1:] == [None] * len(EMPTY_CAPTIONS)
    assert stream.skipped_names == [f"s.tar/k{i}" for i in range(1, len(captions))]


@pytest.mark.parametrize("bad", BAD_IMAGE_IDS, ids=repr)
def test_caption_json_refuses_bad_image_ids(tmp_path, bad):
    (tmp_path / "images").mkdir()
    path = tmp_path / "ann.json"

    def refused(data) -> str:
        path.write_text(json.dumps(data))
        with pytest.raises(ValueError) as err:
            CaptionJSON(path, tmp_path / "images")
        assert "\n" not in str(err.value)
        return str(err.value)

    lavis = [{"image": "a.png", "caption": "x", "image_id": 1}, {"image": "b.png", "caption": "y", "image_id": bad}]
    assert refused(lavis).startswith(f"{path}: entry 1 has image_id {bad!r}; an image id is a non-empty str or an int")
    # COCO, in an annotation (True == 1 would have matched image 1) and in 'images'.
    images = [{"id": 1, "file_name": "a.png"}]
    annotations = [{"image_id": 1, "caption": "x"}, {"image_id": bad, "caption": "y"}]
    message = refused({"images": images, "annotations": annotations})
    assert message.startswith(f"{path}: annotation 1 has image_id {bad!r};")
    message = refused({"images": [*images, {"id": bad, "file_name": "b.png"}], "annotations": []})
    assert message.startswith(f"{path}: images entry 1 has image_id {bad!r};")


@pytest.mark.parametrize("bad", ["", "  ", 3, ["a.png"], {"path": "a.png"}], ids=repr)
def test_caption_json_refuses_bad_image_fields(tmp_path, bad):
    (tmp_path / "images").mkdir()
    path = tmp_path / "ann.json"
    for data in (
        [{"image": "a.png", "caption": "x"}, {"image": bad, "caption": "y"}],
        {
            "images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": bad}],
            "annotations": [{"image_id": 1, "caption": "x"}, {"image_id": 2, "caption": "y"}],
        },
    ):
        path.write_text(json.dumps(data))
        with pytest.raises(ValueError) as err:
            CaptionJSON(path, tmp_path / "images")
        assert str(err.value).startswith(f"{path}: entry 1 needs 'image' a non-empty str")
        assert f"got {bad!r}" in str(err.value)


def test_caption_json_refuses_two_ids_for_one_image(tmp_path):
    (tmp_path / "images").mkdir()
    path = tmp_path / "ann.json"

    def entry(image_id):
        return {"image": "a.png", "caption": "x", **({} if image_id == "absent" else {"image_id": image_id})}

    for first, second in ((1, 2), (1, "1"), (1, "absent"), (None, "x"), ("absent", 7)):
        path.write_text(json.dumps([entry(first), {"image": "b.png", "caption": "z"}, entry(second)]))
        with pytest.raises(ValueError, match=r"entry 2 gives image 'a.png' the image_id .*, entry 0 gave it"):
            CaptionJSON(path, tmp_path / "images")
    # One id given twice, or none (absent or null) twice, is one image.
    for first, second in ((3, 3), ("absent", None)):
        path.write_text(json.dumps([entry(first), entry(second)]))
        assert CaptionJSON(path, tmp_path / "images").num_images == 1
    coco = {"images": [{"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "b.png"}], "annotations": []}
    path.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match="images entry 1 repeats the id 1"):
        CaptionJSON(path, tmp_path / "images")


def test_image_text_dataset_refuses_ids_and_captions_of_the_wrong_type():
    image = random_image(0, size=(8, 8))

    def first(record):
        return ImageTextDataset([record], build_transform(8, train=False))[0]

    for good in (3, np.int64(3), torch.tensor(3)):
        assert first({"image": image, "caption": "a cat", "image_id": good})["image_id"] == 3
    # int() would have truncated 1.5, parsed "3" and taken True for 1.
    for bad in (1.5, 3.0, "3", True, None, [3]):
        with pytest.raises(ValueError, match=r"^sample 0: image_id must be an int, got "):
            first({"image": image, "caption": "a cat", "image_id": bad})
    for bad in (b"a cat", ["a cat"], 3):
        with pytest.raises(ValueError, match=r"^sample 0: a caption must be a str"):
            first({"image": image, "caption": bad})


def test_train_pixels_do_not_depend_on_workers(tmp_path, tokenizer):
    source = SyntheticShapes(12, 32, seed=3)
    collate = partial(collate_batch, tokenizer=tokenizer)
    runs = []
    for workers in (0, 2):
        dataset = ImageTextDataset(source, build_transform(24, train=True), seed=5)
        dataset.set_epoch(1)
        runs.append(list(DataLoader(dataset, batch_size=5, num_workers=workers, collate_fn=collate)))
    for b0, b2 in zip(*runs, strict=True):
        assert torch.equal(b0["pixels"], b2["pixels"]) and b0["captions"] == b2["captions"]
    dataset = ImageTextDataset(source, build_transform(24, train=True), seed=5)
    dataset.set_epoch(2)
    assert not torch.equal(dataset[0]["pixels"], runs[0][0]["pixels"][0])  # a new epoch, new crops


# --------------------------------------------------------------------------- collate


def test_collate_pads_truncates_and_drops_none(tokenizer):
    pixels = torch.randn(3, 8, 8)
    long = " ".join(["word"] * 40)
    samples = [
        {"pixels": pixels, "caption": "a red circle", "image_id": 3, "index": 0},
        None,
        {"pixels": pixels + 1, "caption": long, "image_id": 9, "index": 2},
    ]
    batch = collate_batch(samples, tokenizer, max_length=10)
    assert batch["skipped"] == 1 and batch["captions"] == ["a red circle", long]
    assert batch["pixels"].shape == (2, 3, 8, 8) and batch["pixels"].dtype == torch.float32
    assert batch["input_ids"].shape == (2, 10) and batch["input_ids"].dtype == torch.int64
    assert batch["attention_mask"].dtype == torch.bool
    assert batch["attention_mask"].sum(1).tolist() == [5, 10]  # [CLS] a red circle [SEP], then padding
    assert batch["input_ids"][0, 5:].eq(tokenizer.pad_token_id).all()
    assert batch["input_ids"][:, 0].eq(tokenizer.cls_token_id).all()
    assert batch["image_ids"].tolist() == [3, 9] and batch["image_ids"].dtype == torch.int64
    short = collate_batch(samples[:1], tokenizer, max_length=10)
    assert short["input_ids"].shape == (1, 5)  # padding to the longest, not to max_length
    empty = collate_batch([None, None], tokenizer)
    assert empty["skipped"] == 2 and empty["pixels"].shape[0] == 0 and empty["input_ids"].shape[0] == 0
    with pytest.raises(ValueError, match=r"one shape \(3, S, S\)"):
        collate_batch([samples[0], {**samples[0], "pixels": torch.randn(3, 4, 4)}], tokenizer)


# --------------------------------------------------------------------------- tar shards


def jpeg_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    random_image(seed, size=(20, 20)).save(buf, format="JPEG")
    return buf.getvalue()


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def make_shards(root: Path, num_shards: int, per_shard: int) -> dict[str, tuple[bytes, str]]:
    expected = {}
    for s in range(num_shards):
        members = []
        for k in range(per_shard):
            key = f"sample{s:02d}{k:03d}"
            image, caption = jpeg_bytes(100 * s + k), f"Caption {s} {k}."
            members += [(f"{key}.jpg", image), (f"{key}.txt", caption.encode())]
            expected[f"shard-{s:03d}.tar/{key}"] = (image, caption)
        write_shard(root / f"shard-{s:03d}.tar", members)
    return expected


def test_tar_shards_round_trip_and_split(tmp_path):
    expected = make_shards(tmp_path, num_shards=3, per_shard=4)
    pattern = str(tmp_path / "shard-{000..002}.tar")
    assert expand_urls(pattern) == [str(tmp_path / f"shard-{i:03d}.tar") for i in range(3)]
    assert expand_urls(str(tmp_path / "shard-*.tar")) == expand_urls(pattern)
    got = {s["key"]: (s["image"], s["caption"]) for s in WebDatasetShards(pattern)}
    assert got == expected
    # Across ranks: disjoint, together everything (shard-level with 3 shards and 2 ranks).
    parts = [[s["key"] for s in WebDatasetShards(pattern, rank=r, world_size=2)] for r in range(2)]
    assert not set(parts[0]) & set(parts[1]) and set(parts[0]) | set(parts[1]) == set(expected)
    assert [len(p) for p in parts] == [8, 4]  # whole shards: 0 and 2 to rank 0, 1 to rank 1
    # More readers than shards: sample-level split, still disjoint and complete.
    parts = [[s["key"] for s in WebDatasetShards(pattern, rank=r, world_size=5)] for r in range(5)]
    assert sum(map(len, parts)) == len(expected) and set().union(*parts) == set(expected)
    # Forced sample-level split: equal shares (the shard split above gives 8 and 4), disjoint.
    parts = [[s["key"] for s in WebDatasetShards(pattern, rank=r, world_size=2, split="sample")] for r in range(2)]
    assert [len(p) for p in parts] == [6, 6] and set().union(*parts) == set(expected)
    # Across dataloader workers.
    loader = DataLoader(WebDatasetShards(pattern), batch_size=None, num_workers=2)
    assert sorted(s["key"] for s in loader) == sorted(expected)
    # Shuffling reorders per epoch, reproducibly.
    shuffled = WebDatasetShards(pattern, shuffle=True, shuffle_buffer=5, seed=1)
    order1 = [s["key"] for s in shuffled]
    assert sorted(order1) == sorted(expected) and order1 != sorted(expected)
    assert [s["key"] for s in shuffled] == order1
    shuffled.set_epoch(1)
    assert [s["key"] for s in shuffled] != order1
    with pytest.raises(FileNotFoundError, match="shard-003.tar"):
        WebDatasetShards(str(tmp_path / "shard-{002..003}.tar"))
    with pytest.raises(ValueError, match="rank"):
        WebDatasetShards(pattern, rank=2, world_size=2)


def test_tar_shards_through_image_text_dataset_skip_bad_samples(tmp_path, tokenizer):
    png = io.BytesIO()
    random_image(3).save(png, format="PNG")
    write_shard(
        tmp_path / "s.tar",
        [
            ("dir/a.png", png.getvalue()),
            ("dir/a.txt", b"A PNG (in a folder)."),
            ("dir/a.json", json.dumps({"image_id": 12}).encode()),
            ("b.jpg", b"\xff\xd8 this is no jpeg"),
            ("b.txt", b"broken"),
            ("c.txt", b"caption without image"),
            ("d.jpeg", jpeg_bytes(4)),
            ("d.txt", b"A JPEG"),
        ],
    )
    write_shard(
        tmp_path / "t.tar",
        [
            (f"{k}.{ext}", data)
            for k in "xy"
            for ext, data in (("png", png.getvalue()), ("json", b'{"image_id": "coco_1"}'))
        ],
    )
    shared = [s["image_id"] for s in WebDatasetShards(str(tmp_path / "t.tar"))]
    assert len(shared) == 2 and shared[0] == shared[1]  # a str image_id is shared, not per sample
    dataset = ImageTextDataset(WebDatasetShards(str(tmp_path / "s.tar")), build_transform(16, train=True))
    assert isinstance(dataset, torch.utils.data.IterableDataset) and not hasattr(dataset, "__len__")
    samples = list(dataset)
    assert [s is None for s in samples] == [False, True, True, False]
    assert dataset.skipped == 2
    assert samples[0]["caption"] == "a png in a folder" and samples[0]["image_id"] == 12
    assert samples[3]["pixels"].shape == (3, 16, 16)
    batch = collate_batch(samples, tokenizer)
    assert batch["skipped"] == 2 and batch["captions"] == ["a png in a folder", "a jpeg"]
    # With workers each process counts its own skips; the batches carry them back.
    collate = partial(collate_batch, tokenizer=tokenizer)
    batches = list(DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate))
    assert sum(b["skipped"] for b in batches) == 2
    assert sorted(c for b in batches for c in b["captions"]) == ["a jpeg", "a png in a folder"]
    # Ids without a json are stable hashes, distinct per sample.
    ids = [s["image_id"] for s in WebDatasetShards(str(tmp_path / "s.tar"))]
    assert ids[0] == 12 and len(set(ids)) == 4
    assert ids == [s["image_id"] for s in WebDatasetShards(str(tmp_path / "s.tar"))]


def test_tar_shard_samples_with_bad_text_or_ids_are_skipped(tmp_path):
    png = io.BytesIO()
    random_image(6, size=(8, 8)).save(png, format="PNG")
    metadata = [
        ("txt", b"A fine caption", None, None),  # kept: no json, the sample's own id
        ("txt", b"caf\xe9 au lait", None, "k1.txt is not UTF-8 text"),  # latin-1
        ("txt", b"ok", b"{oops", "k2.json is not valid JSON"),
        ("txt", b"ok", b"[12]", "k3.json is not a JSON object"),
        ("txt", b"ok", b'{"image_id": 12}', None),  # kept
        ("txt", b"ok", b'{"width": 8}', None),  # kept: no image_id in the json
    ]
    metadata += [("txt", b"ok", json.dumps({"image_id": v}).encode(), f"has image_id {v!r}") for v in BAD_IMAGE_IDS]
    members = []
    for i, (ext, caption, meta, _) in enumerate(metadata):
        members += [(f"k{i}.png", png.getvalue()), (f"k{i}.{ext}", caption)]
        members += [(f"k{i}.json", meta)] if meta is not None else []
    write_shard(tmp_path / "s.tar", members)
    records = list(WebDatasetShards(str(tmp_path / "s.tar")))
    for record, (_, _, _, problem) in zip(records, metadata, strict=True):
        assert isinstance(record["image_id"], int)  # a reader alone still gets an int
        assert (problem is None and "error" not in record) or problem in record["error"], (record, problem)
    dataset = ImageTextDataset(WebDatasetShards(str(tmp_path / "s.tar")), build_transform(8, train=False))
    samples = list(dataset)
    assert [s is None for s in samples] == [problem is not None for *_, problem in metadata]
    assert dataset.skipped_names == [f"s.tar/k{i}" for i, (*_, p) in enumerate(metadata) if p is not None]
    assert samples[4]["image_id"] == 12


@pytest.mark.parametrize("cut", [0.5, 0.33, 0.8], ids=["at-block", "in-data", "late"])
def test_damaged_shard_keeps_its_intact_samples(tmp_path, cut):
    make_shards(tmp_path, num_shards=1, per_shard=6)
    data = (tmp_path / "shard-000.tar").read_bytes()
    end = len(data.rstrip(b"\0"))  # the last member's data, before the zero blocks
    (tmp_path / "cut.tar").write_bytes(data[: int(end * cut) // 512 * 512 if cut == 0.5 else int(end * cut)])
    shards = WebDatasetShards(str(tmp_path / "cut.tar"))
    keys = [s["key"] for s in shards]
    assert 1 <= len(keys) < 6 and shards.shard_errors == 1
    assert keys == [f"cut.tar/sample00{k:03d}" for k in range(len(keys))]


@pytest.mark.parametrize(
    "suffix, compress", [("tar.gz", gzip.compress), ("tar.bz2", bz2.compress), ("tar.xz", lzma.compress)]
)
@pytest.mark.parametrize("cut", [0.3, 0.7, 0.99])
def test_a_compressed_shard_cut_short_is_counted_not_silently_shorter(tmp_path, suffix, compress, cut):
    """tarfile's own decompression reads a cut stream as the archive's end: such a shard gave fewer samples
    without a word. Whole, it gives all of them and no error."""
    make_shards(tmp_path, num_shards=1, per_shard=6)
    packed = compress((tmp_path / "shard-000.tar").read_bytes())
    (tmp_path / f"whole.{suffix}").write_bytes(packed)
    (tmp_path / f"cut.{suffix}").write_bytes(packed[: int(len(packed) * cut)])
    whole = WebDatasetShards(str(tmp_path / f"whole.{suffix}"))
    assert len(list(whole)) == 6 and whole.shard_errors == 0
    shards = WebDatasetShards(str(tmp_path / f"cut.{suffix}"))
    keys = [s["key"] for s in shards]  # all 6 when only the stream's end is cut
    assert shards.shard_errors == 1
    assert keys == [f"cut.{suffix}/sample00{k:03d}" for k in range(len(keys))]


# --------------------------------------------------------------------------- feature cache


class CountingEncoder(torch.nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        self.proj = torch.nn.Linear(3, 5)
        generator = torch.Generator().manual_seed(seed)
        torch.nn.init.normal_(self.proj.weight, generator=generator)
        torch.nn.init.normal_(self.proj.bias, generator=generator)
        self.calls = 0
        self.rows = 0

    def forward(self, pixels):  # (B, 3, S, S) -> (B, 4, 5): 4 "tokens"
        self.calls += 1
        self.rows += pixels.shape[0]
        pooled = torch.nn.functional.adaptive_avg_pool2d(pixels, 2).flatten(2).transpose(1, 2)
        return self.proj(pooled)


def feature_epoch(cache, loader):
    return torch.cat([cache(b["indices"], b["pixels"]) for b in loader])


def test_feature_cache_computes_once_and_is_reused(tmp_path, tokenizer):
    dataset = ImageTextDataset(SyntheticShapes(10, 32, seed=0), build_transform(16, train=False))
    loader = DataLoader(dataset, batch_size=4, collate_fn=partial(collate_batch, tokenizer=tokenizer))
    encoder = CountingEncoder()
    fingerprint = {"encoder": module_fingerprint(encoder), "image_size": 16}
    path = tmp_path / "cache" / "feats.npy"
    cache = FeatureCache(path, len(dataset), encoder, fingerprint)
    first = feature_epoch(cache, loader)
    assert encoder.rows == 10 and encoder.calls == 3 and cache.complete
    direct = torch.cat([encoder(b["pixels"]) for b in loader]).detach().half()
    assert torch.equal(first, direct)  # features come back through fp16 from the first epoch on
    encoder.calls = encoder.rows = 0
    second = feature_epoch(cache, loader)
    assert encoder.calls == 0 and torch.equal(first, second)
    # A later run with the same fingerprint reads the file without computing anything.
    again = FeatureCache(path, len(dataset), encoder, fingerprint)
    assert again.complete and torch.equal(feature_epoch(again, loader), first) and encoder.calls == 0
    assert torch.equal(again([3, 1], None), first[[3, 1]])
    meta = json.loads(path.with_name("feats.npy.json").read_text())
    assert meta["shape"] == [10, 4, 5] and meta["dtype"] == "float16"
    assert sorted(p.name for p in path.parent.iterdir()) == ["feats.npy", "feats.npy.json"]


def test_feature_cache_recomputes_on_fingerprint_mismatch(tmp_path, tokenizer):
    dataset = ImageTextDataset(SyntheticShapes(6, 32, seed=0), build_transform(16, train=False))
    loader = DataLoader(dataset, batch_size=3, collate_fn=partial(collate_batch, tokenizer=tokenizer))
    path = tmp_path / "feats.npy"
    old_encoder, new_encoder = CountingEncoder(seed=0), CountingEncoder(seed=1)
    assert module_fingerprint(old_encoder) != module_fingerprint(new_encoder)
    old = feature_epoch(FeatureCache(path, 6, old_encoder, module_fingerprint(old_encoder)), loader)
    cache = FeatureCache(path, 6, new_encoder, module_fingerprint(new_encoder))
    assert not cache.complete
    new = feature_epoch(cache, loader)
    assert new_encoder.rows == 6 and not torch.allclose(new.float(), old.float())
    # The file on disk now holds the new features; the old fingerprint no longer matches it.
    stale = FeatureCache(path, 6, old_encoder, module_fingerprint(old_encoder))
    assert not stale.complete
    # A sidecar that disagrees with the array (e.g. another sample count) also recomputes.
    assert not FeatureCache(path, 7, new_encoder, module_fingerprint(new_encoder)).complete
    path.with_name("feats.npy.json").write_text("{not json")
    assert not FeatureCache(path, 6, new_encoder, module_fingerprint(new_encoder)).complete


def test_feature_cache_is_only_published_when_complete(tmp_path):
    encoder = CountingEncoder()
    path = tmp_path / "feats.npy"
    cache = FeatureCache(path, 4, encoder, "fp")
    pixels = torch.randn(2, 3, 8, 8)
    cache(torch.tensor([0, 2]), pixels)
    assert not path.exists() and not cache.complete
    cache(torch.tensor([2, 0]), None)  # cached rows need no pixels
    with pytest.raises(ValueError, match="lacks some indices"):
        cache(torch.tensor([1]), None)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        cache(torch.tensor([4]), pixels[:1])
    cache(torch.tensor([1, 3]), pixels)
    assert path.exists() and cache.complete and encoder.calls == 2
    with pytest.raises(ValueError, match=r"\.npy"):
        FeatureCache(tmp_path / "feats.bin", 4, encoder, "fp")
    # An unfinished pass leaves nothing behind once its cache object is gone.
    partial = FeatureCache(tmp_path / "other.npy", 4, encoder, "fp")
    partial(torch.tensor([0, 1]), pixels)
    assert len(list(tmp_path.glob("other.tmp-*.npy"))) == 1
    del partial
    gc.collect()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feats.npy", "feats.npy.json"]


def test_transform_scale_default_matches_blip2():
    transform = build_transform(364, train=True)
    assert transform.scale == (0.5, 1.0) and transform.hflip == 0.5
    assert math.isclose(transform.ratio[0], 3 / 4) and math.isclose(transform.ratio[1], 4 / 3)


def test_feature_cache_crash_before_sidecar_never_serves_stale_features(tmp_path, monkeypatch):
    path = tmp_path / "feats.npy"
    pixels = torch.randn(3, 3, 8, 8)
    old = FeatureCache(path, 3, CountingEncoder(seed=0), "old")(torch.arange(3), pixels)
    real_replace = __import__("os").replace

    def crash_on_sidecar(src, dst):
        if str(dst).endswith(".json"):
            raise KeyboardInterrupt("killed between the array and its sidecar")
        real_replace(src, dst)

    monkeypatch.setattr("blip2_fast.data.os.replace", crash_on_sidecar)
    with pytest.raises(KeyboardInterrupt):
        FeatureCache(path, 3, CountingEncoder(seed=1), "new")(torch.arange(3), pixels)
    monkeypatch.undo()
    # The array on disk now holds the new features: the old fingerprint must not claim it.
    encoder = CountingEncoder(seed=0)
    cache = FeatureCache(path, 3, encoder, "old")
    assert not cache.complete
    assert torch.equal(cache(torch.arange(3), pixels), old) and encoder.calls == 1


def test_a_bad_image_among_several_is_named(tmp_path):
    """PIL's own errors ("Truncated File Read", "cannot identify image file <_io.BytesIO ...>") name no file."""
    from blip2_fast.data import load_pixels

    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "good.png")
    whole = (tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "text.png").write_bytes(b"not an image at all")
    transform = build_transform(8, train=False)
    for bad, said in (("cut.png", "not a readable image"), ("text.png", "not a readable image"),
                      ("missing.png", "no such image file")):  # fmt: skip
        images = [str(tmp_path / "good.png"), str(tmp_path / bad)]
        with pytest.raises(
            OSError if bad == "missing.png" else ValueError, match=re.escape(f"{tmp_path / bad}: {said}")
        ):
            load_pixels(images, transform)
    with pytest.raises(ValueError, match=r"images\[1\]: not a readable image"):
        load_pixels([whole, whole[:20]], transform)
    assert load_pixels([whole, str(tmp_path / "good.png")], transform).shape == (2, 3, 8, 8)
