import gc
import io
import json
import math
import re
import tarfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
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
    with pytest.raises(ValueError, match="entry 0 has an 'image_id'"):
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
