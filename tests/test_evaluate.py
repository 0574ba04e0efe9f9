"""Retrieval scoring (LAVIS compute_sim_matrix) and recall@K."""

from __future__ import annotations

import pytest
import torch

from blip2_fast.config import QFormerConfig, VisionConfig
from blip2_fast.evaluate import collect_split, recall_at_k, retrieval_scores
from blip2_fast.losses import similarity
from blip2_fast.qformer import QFormer
from blip2_fast.vision import ImageEncoder


def test_recall_at_k_by_hand():
    # 3 images; image 0 has captions 0 and 1, image 1 has caption 2, image 2 has caption 3
    txt2img = torch.tensor([0, 0, 1, 2])
    s_i2t = torch.tensor(
        [
            [0.1, 0.9, 0.5, 0.0],  # caption 1 (true) first -> rank 0
            [0.9, 0.8, 0.1, 0.7],  # caption 2 (true) last -> rank 3
            [0.0, 0.9, 0.1, 0.5],  # caption 3 (true) second -> rank 1
        ]
    )
    s_t2i = torch.tensor(
        [
            [0.9, 0.1, 0.0],  # true image 0 rank 0
            [0.1, 0.9, 0.5],  # true image 0 rank 2
            [0.1, 0.9, 0.0],  # true image 1 rank 0
            [0.5, 0.1, 0.4],  # true image 2 rank 1
        ]
    )
    r = recall_at_k(s_i2t, s_t2i, txt2img)
    assert r["txt_r1"] == pytest.approx(100 / 3)
    assert r["txt_r5"] == pytest.approx(100.0)
    assert r["img_r1"] == pytest.approx(50.0)
    assert r["img_r5"] == pytest.approx(100.0)
    assert r["r_mean"] == pytest.approx((r["txt_r_mean"] + r["img_r_mean"]) / 2)


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    vision = ImageEncoder(VisionConfig.preset("tiny"))
    vision.reset_parameters()
    model = QFormer(QFormerConfig.preset("tiny", cross_attention_freq=1)).eval()
    with torch.no_grad():  # a fresh init barely looks at the image: make images distinguishable (no ties)
        for name, p in model.named_parameters():
            if "cross_attn" in name and name.endswith("weight") and p.ndim == 2:
                p.normal_(0, 0.5)
    g = torch.Generator().manual_seed(2)
    n_img, n_txt, T = 5, 7, 6
    ids = torch.randint(1, 100, (n_txt, T), generator=g)
    mask = torch.ones(n_txt, T, dtype=torch.bool)
    mask[2, 4:] = False
    split = {
        "pixels": torch.randn(n_img, 3, 32, 32, generator=g),
        "input_ids": ids.masked_fill(~mask, 0),
        "attention_mask": mask,
        "captions": [f"c{i}" for i in range(n_txt)],
        "txt2img": torch.tensor([0, 1, 2, 3, 4, 0, 2]),
    }
    return vision, model, split


def brute_force(vision, model, split):
    """Every pair scored with ITM + ITC, one pair at a time."""
    n_img, n_txt = split["pixels"].shape[0], split["input_ids"].shape[0]
    with torch.no_grad():
        embeds = vision(split["pixels"])
        img = model.image_features(model.encode_image(embeds).hidden)
        txt = model.text_features(model.encode_text(split["input_ids"], split["attention_mask"]))
        sim = similarity(img, txt)
        full = torch.empty(n_img, n_txt)
        for i in range(n_img):
            for t in range(n_txt):
                h = model.match(embeds[i : i + 1], split["input_ids"][t : t + 1], split["attention_mask"][t : t + 1])
                full[i, t] = model.itm_head(h[:, : model.config.num_query_tokens]).mean(1)[0, 1] + sim[i, t]
    return sim, full


def test_full_rerank_equals_itm_plus_itc_for_every_pair(parts):
    vision, model, split = parts
    s_i2t, s_t2i = retrieval_scores(model, vision, split, k_test=100, batch_size=2, device=torch.device("cpu"))
    _, full = brute_force(vision, model, split)
    torch.testing.assert_close(s_i2t, full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s_t2i, full.t(), rtol=1e-4, atol=1e-4)


def test_only_the_itc_top_k_are_reranked(parts):
    vision, model, split = parts
    k = 2
    s_i2t, s_t2i = retrieval_scores(model, vision, split, k_test=k, batch_size=3, device=torch.device("cpu"))
    sim, full = brute_force(vision, model, split)
    # the rest ranks below every candidate, in ITC order: R@5 and R@10 mean something even with k_test < 10
    for scores, sims, reranked in ((s_i2t, sim, full), (s_t2i, sim.t(), full.t())):
        for row in range(sims.shape[0]):
            top = sims[row].topk(k).indices
            rest = torch.tensor([c for c in range(sims.shape[1]) if c not in set(top.tolist())])
            torch.testing.assert_close(scores[row, top], reranked[row, top], rtol=1e-4, atol=1e-4)
            assert scores[row, rest].max() < scores[row, top].min()
            assert torch.equal(scores[row, rest].argsort(), sims[row, rest].argsort())


def test_collect_split_groups_captions_by_image_id():
    class Tok:
        def __call__(self, captions, **kw):
            n = max(len(c.split()) for c in captions) + 1
            ids = torch.tensor([[101] + [5] * len(c.split()) + [0] * (n - 1 - len(c.split())) for c in captions])
            return {"input_ids": ids, "attention_mask": ids != 0}

    from blip2_fast.data import collate_batch

    samples = [
        {"pixels": torch.full((3, 4, 4), float(i)), "caption": "a " * (i + 1), "image_id": iid, "index": i}
        for i, iid in enumerate([10, 11, 10, 12])
    ]
    split = collect_split(samples + [None], lambda s: collate_batch(s, Tok()), batch_size=3)
    assert split["pixels"].shape[0] == 3  # image 10 once
    assert split["txt2img"].tolist() == [0, 1, 0, 2]
    assert torch.equal(split["pixels"][0], torch.zeros(3, 4, 4))  # the first sample of image 10
    assert split["input_ids"].shape == (4, 5) and split["attention_mask"].dtype == torch.bool
    assert split["skipped"] == 1  # the None sample (an unreadable image) is counted, not only left out


def test_any_checkpoint_on_a_caption_json(hf_retrieval_folder, tmp_path):
    """`--checkpoint <transformers folder> --annotations --images`: the recall of a full re-rank (k_test covers
    every candidate) equals ITM logit + ITC for every pair, computed here from the same files by Blip2Stage1."""
    import json

    from blip2_fast.data import SyntheticShapes
    from blip2_fast.evaluate import main, recall_at_k
    from blip2_fast.stage1 import Blip2Stage1

    shapes = SyntheticShapes(6, image_size=64, seed=21)
    entries, files, captions, txt2img = [], [], [], []
    for i in range(6):
        sample = shapes[i]
        sample["image"].save(tmp_path / f"{i}.png")
        for caption in (sample["caption"], f"picture {i}: {sample['caption']}"):
            entries.append({"image": f"{i}.png", "caption": caption, "image_id": i})
            captions.append(caption)
            txt2img.append(i)
        files.append(tmp_path / f"{i}.png")
    (tmp_path / "test.json").write_text(json.dumps(entries))
    args = ["--checkpoint", str(hf_retrieval_folder), "--annotations", str(tmp_path / "test.json")]
    metrics = main([*args, "--images", str(tmp_path), "--k-test", "12"])
    assert (metrics["n_images"], metrics["n_texts"]) == (6, 12)

    model = Blip2Stage1.from_pretrained(hf_retrieval_folder)
    pixels = model.pixels(files)
    ids, mask = model.tokenize(captions)
    with torch.no_grad():
        q = model.qformer
        embeds = model.vision(pixels).float()
        pairs = q.match(embeds.repeat_interleave(12, 0), ids.repeat(6, 1), mask.repeat(6, 1))
        itm = q.itm_logits(pairs)[:, 1].view(6, 12)
    score = itm + model.itc_scores(pixels, captions)
    want = recall_at_k(score, score.t(), torch.tensor(txt2img))
    for key in ("txt_r1", "txt_r5", "img_r1", "img_r5"):
        assert metrics[key] == pytest.approx(want[key]), key
    with pytest.raises(SystemExit):
        main(args)  # --annotations without --images


def _caption_json(folder, n: int = 4):
    """n synthetic images and two captions each, plus an entry whose JPEG is cut short (as a failed copy leaves
    it): a caption JSON as evaluate's --annotations takes it."""
    import io
    import json

    from blip2_fast.data import SyntheticShapes

    shapes = SyntheticShapes(n, image_size=64, seed=21)
    entries = []
    for i in range(n):
        sample = shapes[i]
        sample["image"].save(folder / f"{i}.png")
        entries += [{"image": f"{i}.png", "caption": c, "image_id": i} for c in (sample["caption"], f"picture {i}")]
    buf = io.BytesIO()
    shapes[0]["image"].save(buf, format="JPEG")
    (folder / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    entries.append({"image": "cut.jpg", "caption": "a cut file", "image_id": n})
    (folder / "test.json").write_text(json.dumps(entries))
    return ["--annotations", str(folder / "test.json"), "--images", str(folder)]


def test_a_run_folder_vit_is_used_or_refused_never_skipped(tmp_path, make_run_folder, capsys):
    from blip2_fast.evaluate import main

    run = tmp_path / "run"
    make_run_folder(run)
    with pytest.raises(FileNotFoundError, match=r"^--vision: .*typo\.safetensors does not exist$"):
        main(["--checkpoint", str(run), "--vision", str(tmp_path / "typo.safetensors")])
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(run), "--num-heads", "4"])  # a run records its head count
    assert "--num-heads is for a LAVIS .pth" in capsys.readouterr().err
    (run / "vision.safetensors").rename(tmp_path / "vit.safetensors")
    with pytest.raises(FileNotFoundError, match=r"run/vision\.safetensors not found .*: pass --vision"):
        main(["--checkpoint", str(run)])  # not a random ViT from config.yaml's seed


def test_a_lavis_pth_on_a_caption_json_takes_its_vit_and_head_count_from_the_options(tmp_path, make_run_folder, capsys):
    """`--checkpoint blip2_pretrained.pth --num-heads N --vision <ViT> --annotations --images`: the figures of the
    run the .pth was written from; a cut JPEG among the images is skipped, counted and named."""
    from test_stage1_api import lavis_stage1

    from blip2_fast.evaluate import main

    run = tmp_path / "run"
    qformer, _ = make_run_folder(run)
    torch.save({"model": lavis_stage1(qformer)}, tmp_path / "blip2_pretrained.pth")
    (tmp_path / "images").mkdir()
    data = _caption_json(tmp_path / "images") + ["--k-test", "8"]
    lavis = ["--checkpoint", str(tmp_path / "blip2_pretrained.pth"), *data]
    with pytest.raises(ValueError, match=r"no EVA ViT .* --vision"):
        main([*lavis, "--num-heads", "4"])
    with pytest.raises(ValueError, match=r"its head count cannot be read from shapes"):
        main([*lavis, "--vision", str(run / "vision.safetensors")])
    with pytest.raises(SystemExit):
        main([*lavis, "--config", str(run / "config.yaml")])
    assert "--config is a run's training config" in capsys.readouterr().err

    got = main([*lavis, "--num-heads", "4", "--vision", str(run / "vision.safetensors")])
    assert "skipped 1 held-out samples (a missing or unreadable image, or no caption): " in capsys.readouterr().out
    want = main(["--checkpoint", str(run), *data])
    assert (got["n_images"], got["n_texts"], got["n_skipped"]) == (4, 8, 1)
    assert {k: got[k] for k in want} == want
