"""Image-text retrieval (LAVIS style) and Q-Former captioning on a held-out split.

    python -m blip2_fast.evaluate --checkpoint runs/stage1-default/model.safetensors
    torchrun --nproc_per_node 4 -m blip2_fast.evaluate --checkpoint runs/coco/model.safetensors
    python -m blip2_fast.evaluate --checkpoint blip2-itm-vit-g/ --annotations coco_test.json --images coco/ \
        --k-test 128                       # any checkpoint Blip2Stage1 reads, on a caption JSON + image folder
    python -m blip2_fast.evaluate --checkpoint blip2_pretrained.pth --vision eva_vit_g.pth \
        --annotations coco_test.json --images coco/   # LAVIS leaves the frozen ViT out of its checkpoints

Retrieval follows LAVIS' ``compute_sim_matrix``: ITC similarities (max over
queries) pick the ``k_test`` best candidates of every image and every text;
those are re-scored by the ITM head (the logit of "match" averaged over the
queries) and the final score of a candidate is ITM + ITC. Everything else ranks
below every candidate in ITC order (LAVIS leaves it at -100, ties in whatever
order a sort gives them): the same figures whenever ``k_test`` >= 10, and
defined ones below. Recall@K is the share of images whose ground-truth caption (any
of them) ranks in the top K (image -> text), and of captions whose image does
(text -> image), in percent.

Work is sharded across ranks: each rank encodes a strided share of the images
and texts and re-ranks a strided share of the rows; the score matrices are
summed across ranks.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from blip2_fast import distributed
from blip2_fast.losses import similarity
from blip2_fast.qformer import QFormer


def collect_split(dataset, collate, batch_size: int) -> dict[str, Any]:
    """Read a held-out split: unique images (by image_id) and every caption with the index of its image.

    Samples the dataset gives as None (a missing or unreadable image, no caption) are left out and counted in
    ``skipped``; ``skipped_names`` takes the dataset's names of them, where it keeps them (ImageTextDataset)."""
    pixels, input_ids, masks, captions = [], [], [], []
    image_index: dict[Any, int] = {}
    txt2img: list[int] = []
    first_pixels: list[torch.Tensor] = []

    def flush(samples):
        batch = collate(samples)
        for b, image_id in enumerate(batch["image_ids"].tolist()):
            if image_id not in image_index:
                image_index[image_id] = len(image_index)
                first_pixels.append(batch["pixels"][b])
            txt2img.append(image_index[image_id])
        input_ids.append(batch["input_ids"])
        masks.append(batch["attention_mask"])
        captions.extend(batch["captions"])

    samples, skipped = [], 0
    items = (dataset[i] for i in range(len(dataset))) if hasattr(dataset, "__len__") else iter(dataset)
    for sample in items:
        if sample is None:
            skipped += 1
            continue
        samples.append(sample)
        if len(samples) == batch_size:
            flush(samples)
            samples = []
    if samples:
        flush(samples)
    if not first_pixels:
        raise ValueError("the held-out split has no loadable sample")
    length = max(x.shape[1] for x in input_ids)
    pad = torch.nn.functional.pad
    ids = torch.cat([pad(x, (0, length - x.shape[1])) for x in input_ids])
    mask = torch.cat([pad(m, (0, length - m.shape[1]), value=False) for m in masks])
    del pixels
    return {
        "pixels": torch.stack(first_pixels),
        "input_ids": ids,
        "attention_mask": mask.bool(),
        "captions": captions,
        "txt2img": torch.tensor(txt2img),
        "skipped": skipped,
        # a dataset read again (each periodic evaluation) names the same samples again
        "skipped_names": list(dict.fromkeys(getattr(dataset, "skipped_names", []))) if skipped else [],
    }


def _gather_strided(local: torch.Tensor, total: int) -> torch.Tensor:
    """Rows r, r + world, ... computed on rank r -> all ``total`` rows in order, on every rank."""
    world = distributed.get_world_size()
    if world == 1:
        return local
    parts = distributed.all_gather_object(local.cpu())
    out = torch.empty(total, *local.shape[1:], dtype=local.dtype)
    for r, part in enumerate(parts):
        out[r::world] = part
    return out.to(local.device)


@torch.no_grad()
def retrieval_scores(
    model: QFormer,
    vision,
    split: dict[str, Any],
    *,
    k_test: int,
    batch_size: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LAVIS-style score matrices: (I, T) image->text and (T, I) text->image."""
    model.eval()
    rank, world = distributed.get_rank(), distributed.get_world_size()
    pixels, ids, mask = split["pixels"], split["input_ids"], split["attention_mask"]
    n_img, n_txt = pixels.shape[0], ids.shape[0]

    embeds, img_feats = [], []
    mine = torch.arange(rank, n_img, world)
    for chunk in mine.split(batch_size):
        e = vision(pixels[chunk].to(device)).float()
        embeds.append(e)
        img_feats.append(model.image_features(model.encode_image(e).hidden))
    width = (vision.config.num_tokens, vision.config.hidden_size)
    embeds = torch.cat(embeds) if embeds else torch.empty(0, *width, device=device)
    q_d = (model.config.num_query_tokens, model.config.embed_dim)
    img_feats = torch.cat(img_feats) if img_feats else torch.empty(0, *q_d, device=device)  # a rank with no image
    image_embeds = _gather_strided(embeds, n_img)  # (I, N, E)
    image_feats = _gather_strided(img_feats, n_img)  # (I, Q, D)

    txt_feats = []
    for chunk in torch.arange(rank, n_txt, world).split(batch_size):
        t_ids, t_mask = ids[chunk].to(device), mask[chunk].to(device)
        txt_feats.append(model.text_features(model.encode_text(t_ids, t_mask)))
    txt_feats = torch.cat(txt_feats) if txt_feats else torch.empty(0, model.config.embed_dim, device=device)
    text_feats = _gather_strided(txt_feats, n_txt)  # (T, D)

    sim_i2t = similarity(image_feats, text_feats)  # (I, T)
    k_i2t, k_t2i = min(k_test, n_txt), min(k_test, n_img)

    def itm_score(image_rows: torch.Tensor, text_rows: torch.Tensor) -> torch.Tensor:
        hidden = model.match(image_embeds[image_rows], ids[text_rows].to(device), mask[text_rows].to(device))
        return model.itm_logits(hidden)[:, 1].float()

    def ranked(sims: torch.Tensor, top_idx: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        # the re-scored candidates, then the rest below the lowest of them, in ITC order (a small shift: fp32
        # keeps the ITC differences)
        row = sims + (candidates.min() - sims.max() - 1.0)
        row[top_idx] = candidates
        return row

    # the ITM re-ranking is most of the time (k_test matching passes per image and per text): shown as it goes
    bar = tqdm(total=len(range(rank, n_img, world)) + len(range(rank, n_txt, world)), desc="ITM re-ranking",
               unit="query", disable=rank != 0, leave=False)  # fmt: skip
    score_i2t = torch.zeros(n_img, n_txt, device=device)
    for i in range(rank, n_img, world):
        top_sim, top_idx = sim_i2t[i].topk(k_i2t)
        score_i2t[i] = ranked(sim_i2t[i], top_idx, itm_score(torch.full((k_i2t,), i, device=device), top_idx) + top_sim)
        bar.update()
    score_t2i = torch.zeros(n_txt, n_img, device=device)
    sim_t2i = sim_i2t.t()
    for t in range(rank, n_txt, world):
        top_sim, top_idx = sim_t2i[t].topk(k_t2i)
        score_t2i[t] = ranked(sim_t2i[t], top_idx, itm_score(top_idx, torch.full((k_t2i,), t, device=device)) + top_sim)
        bar.update()
    bar.close()
    distributed.all_reduce_sum(score_i2t)
    distributed.all_reduce_sum(score_t2i)
    return score_i2t, score_t2i


def recall_at_k(score_i2t: torch.Tensor, score_t2i: torch.Tensor, txt2img: torch.Tensor) -> dict[str, float]:
    """R@1/5/10 both ways in percent, and their mean. txt2img (T,): the image of each caption."""
    txt2img = txt2img.to(score_i2t.device)
    n_img = score_i2t.shape[0]
    order = score_i2t.argsort(dim=1, descending=True, stable=True)  # (I, T) texts, best first
    position = torch.empty_like(order)
    position.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    is_gt = txt2img[None, :] == torch.arange(n_img, device=order.device)[:, None]  # (I, T)
    big = torch.iinfo(position.dtype).max
    txt_rank = position.masked_fill(~is_gt, big).amin(dim=1)  # best rank of any true caption
    order_t = score_t2i.argsort(dim=1, descending=True, stable=True)  # (T, I)
    img_rank = (order_t == txt2img[:, None]).float().argmax(dim=1)
    out = {}
    for k in (1, 5, 10):
        out[f"txt_r{k}"] = 100.0 * float((txt_rank < k).float().mean())
        out[f"img_r{k}"] = 100.0 * float((img_rank < k).float().mean())
    out["txt_r_mean"] = (out["txt_r1"] + out["txt_r5"] + out["txt_r10"]) / 3
    out["img_r_mean"] = (out["img_r1"] + out["img_r5"] + out["img_r10"]) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def evaluate_run(model: QFormer, vision, held_out, tokenizer, config, device: torch.device) -> dict[str, float]:
    """Retrieval on ``held_out`` (all ranks) and captions of a few images (printed by rank 0)."""
    from blip2_fast import data as D
    from blip2_fast.generate import caption

    e = config.eval
    split = collect_split(
        held_out, lambda s: D.collate_batch(s, tokenizer, max_length=config.model.max_text_length), e.batch_size
    )
    s_i2t, s_t2i = retrieval_scores(model, vision, split, k_test=e.k_test, batch_size=e.batch_size, device=device)
    metrics = recall_at_k(s_i2t, s_t2i, split["txt2img"])
    metrics["n_images"] = int(split["pixels"].shape[0])
    metrics["n_texts"] = int(split["input_ids"].shape[0])
    metrics["n_skipped"] = split["skipped"]
    if split["skipped"] and distributed.get_rank() == 0:
        why = "held-out samples (a missing or unreadable image, or no caption)"
        print(skipped_summary(split["skipped"], split["skipped_names"], why))
    if distributed.get_rank() == 0 and e.num_captions:
        n = min(e.num_captions, metrics["n_images"])
        with torch.no_grad():
            feats = vision(split["pixels"][:n].to(device)).float()
            kw = dict(max_new_tokens=e.max_new_tokens, min_new_tokens=e.min_new_tokens)
            greedy = caption(model, feats, tokenizer, num_beams=1, **kw)
            beam = caption(model, feats, tokenizer, num_beams=e.num_beams, **kw)
        truth = {}
        for t, i in enumerate(split["txt2img"].tolist()):
            truth.setdefault(i, split["captions"][t])
        print("captions of held-out images (Q-Former ITG decoding):")
        for i in range(n):
            print(f"  [{i}] truth : {truth[i]}")
            print(f"      greedy: {greedy[i]}")
            print(f"      beam{e.num_beams} : {beam[i]}")
    return metrics


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description="Retrieval R@1/5/10 and captions of a stage-1 checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="model.safetensors of a run (or the run folder)")
    parser.add_argument(
        "--config",
        default=None,
        help="training config (default: config.yaml beside the checkpoint; not with --annotations)",
    )
    parser.add_argument(
        "--vision",
        default=None,
        help="ViT weights, any source model.vision_weights takes (default: vision.safetensors beside a run's "
        "checkpoint, the checkpoint's own with --annotations; a LAVIS .pth holds none: eva_vit_g.pth)",
    )
    parser.add_argument(
        "--num-heads",
        type=int,
        default=None,
        help="Q-Former attention heads of a LAVIS .pth --checkpoint, which shapes cannot tell (BLIP-2's: 12)",
    )
    parser.add_argument(
        "--k-test",
        type=int,
        default=None,
        help="candidates re-ranked by ITM (default: eval.k_test; 128 with --annotations)",
    )
    parser.add_argument("--annotations", default=None, help="caption JSON (COCO or LAVIS) to evaluate on instead")
    parser.add_argument("--images", default=None, help="image folder of --annotations")
    parser.add_argument("--out", default=None, help="JSON file for the metrics (metrics.csv's keys: txt_r1, ...)")
    args = parser.parse_args(argv)
    if (args.annotations is None) != (args.images is None):
        parser.error("--annotations and --images go together")
    if args.annotations is not None:
        if args.config is not None:
            parser.error("--config is a run's training config, for its own held-out split: not with --annotations")
        metrics = evaluate_pretrained(
            args.checkpoint, args.annotations, args.images, k_test=args.k_test, vision=args.vision,
            num_attention_heads=args.num_heads,
        )  # fmt: skip
        return _written(metrics, args.out)
    if args.num_heads is not None:
        parser.error("--num-heads is for a LAVIS .pth with --annotations: a run's model.safetensors records its own")

    from blip2_fast.checkpoint import load_qformer
    from blip2_fast.train import build_datasets, build_tokenizer, build_vision, load_config

    path = Path(args.checkpoint)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint: {path} does not exist")
    config_path = Path(args.config) if args.config else path.parent / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"no training config at {config_path}; pass --config")
    overrides = [("model.vision_weights", str(_run_vision(path, args.vision)))]
    if args.k_test is not None:
        overrides.append(("eval.k_test", str(args.k_test)))
    config = load_config(config_path, overrides)
    device = distributed.init_from_launcher()
    tokenizer = build_tokenizer(config)
    vision = build_vision(config).freeze().to_device(device)  # a fine-tuning run's config unfreezes it
    model = load_qformer(path).to(device).eval()
    _, held_out = build_datasets(config, vision.config.image_size)
    if held_out is None:
        raise ValueError("the config names no held-out split (data.eval_annotation_file / data.eval_urls)")
    metrics = evaluate_run(model, vision, held_out, tokenizer, config, device)
    _print_recall(metrics)
    return _written(metrics, args.out)


def _run_vision(checkpoint: Path, vision: str | None) -> Path:
    """The ViT of a run's checkpoint: ``--vision`` when given, else the run's vision.safetensors, which training
    writes when it starts. Never what config.yaml alone builds: a random ViT without model.vision_weights, and
    for a trainable ViT the weights before it learnt."""
    if vision is not None:
        if not Path(vision).exists():
            raise FileNotFoundError(f"--vision: {vision} does not exist")
        return Path(vision)
    path = checkpoint.parent / "vision.safetensors"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found (training writes the run's ViT there when it starts): pass --vision with its weights"
        )
    return path


def _written(metrics: dict[str, float], out: str | None) -> dict[str, float]:
    if out and distributed.get_rank() == 0:
        import json

        from blip2_fast.checkpoint import write_text_atomic

        write_text_atomic(out, json.dumps(metrics, indent=1))
    return metrics


LAVIS_K_TEST = 128  # LAVIS' retrieval configs: candidates per row re-ranked by ITM on COCO and Flickr


def evaluate_pretrained(
    checkpoint: str | Path,
    annotations: str | Path,
    image_root: str | Path,
    *,
    k_test: int | None = None,
    vision: str | Path | None = None,
    num_attention_heads: int | None = None,
) -> dict[str, float]:
    """Retrieval of any checkpoint :class:`blip2_fast.stage1.Blip2Stage1` reads (a run, a transformers BLIP-2
    folder, a LAVIS ``.pth``) on a caption JSON and its image folder, with the checkpoint's own ViT or the one
    ``vision`` names (:func:`blip2_fast.stage1.vision_weights`: LAVIS' pre-training ``.pth`` holds none).
    ``num_attention_heads``: the Q-Former's head count of a LAVIS ``.pth`` (see ``Blip2Stage1.from_pretrained``)."""
    from blip2_fast import data as D
    from blip2_fast.stage1 import Blip2Stage1, vision_weights
    from blip2_fast.train import load_config

    encoder = vision_weights(vision) if vision is not None else None
    device = distributed.init_from_launcher()
    model = Blip2Stage1.from_pretrained(checkpoint, vision=encoder, num_attention_heads=num_attention_heads)
    model.to_device(device)
    overrides = [("model.max_text_length", str(model.max_text_length)), ("eval.num_captions", "0")]
    overrides.append(("eval.k_test", str(k_test if k_test is not None else LAVIS_K_TEST)))
    config = load_config(None, overrides)
    transform = D.build_transform(model.vision.config.image_size, train=False)
    held_out = D.ImageTextDataset(D.CaptionJSON(annotations, image_root), transform, max_words=config.data.max_words)
    metrics = evaluate_run(model.qformer, model.vision, held_out, model.tokenizer, config, device)
    _print_recall(metrics)
    return metrics


def skipped_summary(count: int, names: list[str], what: str, shown: int = 5) -> str:
    """One line on the samples an evaluation left out, naming the first few: its scores are over the rest."""
    listed = ", ".join(names[:shown]) + (", ..." if count > min(len(names), shown) else "")
    return f"skipped {count} {what}" + (f": {listed}" if names else "") + "; the scores leave them out"


def recall_summary(metrics: dict[str, float]) -> str:
    """Retrieval recalls in the one vocabulary training and evaluation print: image->text (the keys txt_r*
    of metrics.csv and the JSON) and text->image (img_r*)."""
    n = metrics["n_images"]
    texts = f"{metrics['n_texts']} captions, " if "n_texts" in metrics else ""
    return (
        f"held-out retrieval ({n} images, {texts}chance R@1 {100 / n:.1f}%): "
        f"image->text R@1 {metrics['txt_r1']:.1f}  R@5 {metrics['txt_r5']:.1f}  R@10 {metrics['txt_r10']:.1f} | "
        f"text->image R@1 {metrics['img_r1']:.1f}  R@5 {metrics['img_r5']:.1f}  R@10 {metrics['img_r10']:.1f} "
        "(txt_r* and img_r* in metrics.csv / --out)"
    )


def _print_recall(metrics: dict[str, float]) -> None:
    if distributed.get_rank() == 0:
        print(recall_summary(metrics))


if __name__ == "__main__":
    from blip2_fast.cli import run_main

    run_main(main)
