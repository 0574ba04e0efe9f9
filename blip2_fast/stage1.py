"""A stage-1 model to use: frozen ViT + Q-Former + tokenizer, fed images and strings.

What LAVIS serves as ``blip2_feature_extractor`` and ``blip2_image_text_matching``, and the
Q-Former's own captioning, from any checkpoint :meth:`Blip2Stage1.from_pretrained` reads: a
training run folder of ours, a transformers BLIP-2 folder or a LAVIS ``.pth``.

Images may be pixel tensors ``(B, 3, S, S)`` already normalised, or PIL images, paths and
encoded bytes, which go through BLIP-2's eval transform (bicubic resize, CLIP mean/std).
Texts get the same caption cleaning as in training (:func:`blip2_fast.data.clean_caption`).

    model = Blip2Stage1.from_pretrained("runs/stage1-default")
    sims = model.itc_scores(["cat.jpg", "dog.jpg"], ["a cat", "a dog"])  # (2 images, 2 texts)
    match = model.itm_scores(["cat.jpg", "dog.jpg"], ["a cat", "a cat"])  # (2,) P(pair matches)
    captions = model.caption(["cat.jpg"], num_beams=3)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from blip2_fast.qformer import ImageContext, QFormer
from blip2_fast.vision import ImageEncoder

LAVIS_MAX_TEXT_LENGTH = 35  # LAVIS' max_txt_len for retrieval and matching

Images = torch.Tensor | Sequence[Any]  # pixels (B, 3, S, S), or PIL images / paths / bytes


@dataclasses.dataclass
class ImageFeatures:
    embeds: torch.Tensor  # (B, Q, H) query outputs
    proj: torch.Tensor  # (B, Q, E) L2-normalised ITC embeddings, one per query
    context: ImageContext  # the image's cross-attention K/V: reuse it for matching or captioning


@dataclasses.dataclass
class TextFeatures:
    embeds: torch.Tensor  # (B, T, H) text outputs
    proj: torch.Tensor  # (B, E) L2-normalised ITC embedding of [CLS]
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor  # (B, T) bool


@dataclasses.dataclass
class RunFiles:
    """What a stage-1 training run leaves for later use (any of the optional parts may be missing)."""

    model: Path  # model.safetensors (save_qformer)
    vision: Path | None  # vision.safetensors: the frozen ViT
    config: dict[str, Any]  # config.yaml, parsed; {} without one


def run_files(path: str | Path) -> RunFiles:
    """The files of a run folder, or of a ``model.safetensors`` with its folder around it."""
    path = Path(path)
    folder, model = (path, path / "model.safetensors") if path.is_dir() else (path.parent, path)
    if not model.is_file():
        raise FileNotFoundError(f"stage-1 checkpoint not found: {model}")
    from blip2_fast.checkpoint import run_config

    vision = folder / "vision.safetensors"
    return RunFiles(model, vision if vision.is_file() else None, run_config(folder))


def vision_weights(source: str | Path) -> ImageEncoder:
    """The ViT a command line's ``--vision`` names: any source ``checkpoint.load_vision`` reads. A ``.pth``
    records no config: it is built as BLIP-2's EVA ViT-g (``VisionConfig()``: 39 of eva_vit_g.pth's 40 blocks,
    16 heads, 224 px); a file of other shapes is refused, naming them."""
    from blip2_fast.checkpoint import load_vision
    from blip2_fast.config import VisionConfig

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"--vision: {path} does not exist")
    return load_vision(path, VisionConfig() if path.suffix in (".pth", ".pt") else None)


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "vocab.txt").is_file() or (folder / "tokenizer.json").is_file()


class Blip2Stage1(nn.Module):
    """Frozen ``vision`` + ``qformer`` (with its text parts) + ``tokenizer``; inference only."""

    def __init__(
        self,
        qformer: QFormer,
        vision: ImageEncoder,
        tokenizer,
        max_text_length: int = LAVIS_MAX_TEXT_LENGTH,
        batch_size: int = 64,
        untrained: Sequence[str] = (),
    ):
        super().__init__()
        if not qformer.config.text_input:
            raise ValueError("Blip2Stage1 needs a Q-Former with its text parts (QFormerConfig.text_input=True)")
        if qformer.config.encoder_width != vision.config.hidden_size:
            raise ValueError(
                f"the Q-Former reads image features of width {qformer.config.encoder_width}, "
                f"the ViT gives {vision.config.hidden_size}"
            )
        if tokenizer.bos_token_id is None:
            raise ValueError("the tokenizer needs [DEC] as its bos_token: use blip2_fast.text.load_tokenizer")
        if len(tokenizer) > qformer.config.vocab_size:
            raise ValueError(
                f"the tokenizer has {len(tokenizer)} tokens, the Q-Former's vocabulary {qformer.config.vocab_size}"
            )
        from blip2_fast.data import build_transform

        self.qformer = qformer.eval()
        self.vision = vision.freeze()
        self.tokenizer = tokenizer
        self.max_text_length = max_text_length
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size  # images (or texts) per forward pass: long lists run batch by batch
        # Q-Former parameters the checkpoint did not hold (a layout without an LM head, say): what reads them
        # would only return noise, so it refuses
        self.untrained = sorted(untrained)
        self.transform = build_transform(vision.config.image_size, train=False)

    @classmethod
    def from_pretrained(
        cls,
        source: str | Path,
        *,
        vision: ImageEncoder | None = None,
        tokenizer=None,
        backend: str | None = None,
        num_attention_heads: int | None = None,
    ) -> Blip2Stage1:
        """A run folder of ours (or its ``model.safetensors``), a transformers BLIP-2 folder, or a LAVIS ``.pth``.

        ``vision`` replaces the checkpoint's ViT (needed when the source holds none, as LAVIS' pre-training
        checkpoints: ``load_vision("eva_vit_g.pth")``); ``tokenizer`` replaces the one found (a run's
        ``model.bert_path``, the transformers folder's own files, else the shipped bert-base-uncased
        vocabulary); ``backend`` picks the attention backend. ``num_attention_heads``: the Q-Former's head
        count of a LAVIS ``.pth``, which its shapes cannot tell (needed unless it is BLIP-2's BERT-base, 12
        heads); the other sources record theirs, and another count for them is an error.
        """
        from blip2_fast.checkpoint import load_checkpoint
        from blip2_fast.text import load_tokenizer

        source = Path(source)
        if not source.exists():
            raise FileNotFoundError(f"no stage-1 model at {source}")
        overrides = {"backend": backend} if backend else {}
        max_length, tokenizer_path, untrained = LAVIS_MAX_TEXT_LENGTH, None, []
        run = source.suffix == ".safetensors" or (source.is_dir() and not (source / "config.json").is_file())
        if num_attention_heads is not None:
            overrides["num_attention_heads"] = num_attention_heads  # load_checkpoint checks it against the record
        if run:
            files = run_files(source)
            qformer = load_checkpoint(files.model, **overrides).qformer
            model_section = files.config.get("model", {})
            max_length = model_section.get("max_text_length", max_length)
            tokenizer_path = model_section.get("bert_path")
            if vision is None:
                vision = cls._run_vision(files)
        else:
            loaded = load_checkpoint(source, vision=vision is None, **overrides)
            qformer, vision = loaded.qformer, vision or loaded.vision
            untrained = [name for name in loaded.report.fresh if not name.startswith("vision.")]
            if vision is None:
                raise ValueError(f"{source} holds no vision model: pass vision=ImageEncoder(...) with its weights")
            if source.is_dir() and _has_tokenizer(source):
                tokenizer_path = source
        tokenizer = tokenizer or load_tokenizer(tokenizer_path, max_length=max_length)
        return cls(qformer, vision, tokenizer, max_text_length=max_length, untrained=untrained)

    @staticmethod
    def _run_vision(files: RunFiles) -> ImageEncoder:
        if files.vision is None:
            raise ValueError(
                f"{files.model.parent}: a run folder needs vision.safetensors beside model.safetensors; "
                "or pass vision=ImageEncoder(...)"
            )
        from blip2_fast.checkpoint import load_vision

        return load_vision(files.vision)

    def to_device(self, device: torch.device | str) -> Blip2Stage1:
        """The Q-Former in fp32 on ``device``; the ViT in half precision there when it is a GPU."""
        self.qformer.to(device)
        self.vision.to_device(device)
        return self

    @property
    def device(self) -> torch.device:
        return self.qformer.query_tokens.device

    # ---------------------------------------------------------------- inputs

    def pixels(self, images: Images) -> torch.Tensor:
        """(B, 3, S, S) on the model's device: tensors as given (shape checked), anything else transformed."""
        from blip2_fast.data import load_pixels

        size = self.vision.config.image_size
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
                raise ValueError(f"pixels must have shape (B, 3, {size}, {size}), got {tuple(images.shape)}")
            return images.to(self.device)
        return load_pixels(images, self.transform).to(self.device)

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, bool attention mask), both (B, T), after the training's caption cleaning."""
        from blip2_fast.data import clean_caption

        if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a non-empty list of strings")
        batch = self.tokenizer(
            [clean_caption(t) for t in texts],
            padding="longest",
            truncation=True,
            max_length=self.max_text_length,
            return_tensors="pt",
        )
        return batch.input_ids.to(self.device), batch.attention_mask.bool().to(self.device)

    def _image_embeds(self, images: Images) -> Iterator[torch.Tensor]:
        """Frozen ViT features (b, N, E), ``batch_size`` images at a time: files are decoded when their batch comes."""
        from blip2_fast.data import check_images

        if isinstance(images, torch.Tensor):
            batches = self.pixels(images).split(self.batch_size)
        else:
            check_images(images)
            batches = (self.pixels(images[i : i + self.batch_size]) for i in range(0, len(images), self.batch_size))
        for pixels in batches:
            yield self.vision(pixels).float()

    def _pairs(self, images: Images, texts: Sequence[str]) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(image features, input_ids, mask) of image i with text i, batch by batch."""
        from blip2_fast.data import check_images

        ids, mask = self.tokenize(texts)
        if not isinstance(images, torch.Tensor):
            check_images(images)
        n_images = images.shape[0] if isinstance(images, torch.Tensor) else len(images)
        if n_images != ids.shape[0]:
            raise ValueError(f"images and texts pair up one to one: got {n_images} images, {ids.shape[0]} texts")
        for start, embeds in zip(range(0, n_images, self.batch_size), self._image_embeds(images), strict=True):
            rows = slice(start, start + embeds.shape[0])
            yield embeds, ids[rows], mask[rows]

    def _require(self, parts: tuple[str, ...], what: str) -> None:
        missing = sorted({name.split(".")[0] for name in self.untrained if name.startswith(parts)})
        if missing:
            raise ValueError(
                f"{what} needs {', '.join(missing)}, which this model's checkpoint did not hold (kept at random "
                "init): use a checkpoint that has them, such as a stage-1 run or a LAVIS .pth"
            )

    # ---------------------------------------------------------------- features

    @torch.no_grad()
    def extract_image(self, images: Images) -> ImageFeatures:
        contexts, embeds = [], []
        for features in self._image_embeds(images):
            contexts.append(self.qformer.image_context(features))
            embeds.append(self.qformer.encode_image(contexts[-1]).hidden)
        hidden = torch.cat(embeds)
        return ImageFeatures(hidden, self.qformer.image_features(hidden), ImageContext.cat(contexts))

    @torch.no_grad()
    def extract_text(self, texts: Sequence[str]) -> TextFeatures:
        ids, mask = self.tokenize(texts)
        rows = range(0, ids.shape[0], self.batch_size)
        embeds = torch.cat(
            [self.qformer.encode_text(ids[r : r + self.batch_size], mask[r : r + self.batch_size]) for r in rows]
        )
        return TextFeatures(embeds, self.qformer.text_features(embeds), ids, mask)

    @torch.no_grad()
    def extract_multimodal(self, images: Images, texts: Sequence[str]) -> torch.Tensor:
        """(B, Q, H): the query outputs of each image read together with its text (LAVIS' multimodal mode)."""
        n_query = self.qformer.config.num_query_tokens
        return torch.cat([self.qformer.match(*pair)[:, :n_query] for pair in self._pairs(images, texts)])

    # ---------------------------------------------------------------- scores

    def _itc_rows(self, context: ImageContext, text_proj: torch.Tensor) -> torch.Tensor:
        """(b, T) ITC of a batch of images (their context) with every text (its projection)."""
        q = self.qformer
        image = q.image_features(q.encode_image(context).hidden)
        return torch.einsum("iqe,te->itq", image, text_proj).amax(dim=-1)

    def _itm_rows(self, context: ImageContext, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(b, T) ITM probability of a batch of images with every text; each image's K/V serves all texts.
        The b * T pairs go ``batch_size`` at a time: thousands of texts never make one giant pass."""
        n_images, n_texts = context.batch_size, ids.shape[0]
        image_of = torch.arange(n_images, device=ids.device).repeat_interleave(n_texts)
        text_of = torch.arange(n_texts, device=ids.device).repeat(n_images)
        probs = []
        for chunk in torch.arange(n_images * n_texts, device=ids.device).split(self.batch_size):
            t = text_of[chunk]
            hidden = self.qformer.match(context.index_select(image_of[chunk]), ids[t], mask[t])
            probs.append(self.qformer.itm_logits(hidden).softmax(dim=-1)[:, 1])
        return torch.cat(probs).view(n_images, n_texts)

    @torch.no_grad()
    def itc_scores(self, images: Images, texts: Sequence[str]) -> torch.Tensor:
        """(n_images, n_texts) cosine similarity, the best over the queries (not divided by the temperature)."""
        self._require(("vision_proj.", "text_proj."), "ITC")
        text = self.extract_text(texts).proj
        return torch.cat([self._itc_rows(self.qformer.image_context(f), text) for f in self._image_embeds(images)])

    @torch.no_grad()
    def itm_scores(self, images: Images, texts: Sequence[str]) -> torch.Tensor:
        """(B,) probability that image i and text i match, from the ITM head."""
        self._require(("itm_head.",), "ITM")
        logits = torch.cat([self.qformer.itm_logits(self.qformer.match(*pair)) for pair in self._pairs(images, texts)])
        return logits.softmax(dim=-1)[:, 1]

    @torch.no_grad()
    def itm_matrix(self, images: Images, texts: Sequence[str]) -> torch.Tensor:
        """(n_images, n_texts) ITM probability of every image with every text; each image's ViT features and
        cross-attention K/V are computed once and shared by all its texts."""
        self._require(("itm_head.",), "ITM")
        ids, mask = self.tokenize(texts)
        return torch.cat([self._itm_rows(self.qformer.image_context(f), ids, mask) for f in self._image_embeds(images)])

    @torch.no_grad()
    def score_matrices(self, images: Images, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(:meth:`itc_scores`, :meth:`itm_matrix`) from one ViT pass over the images."""
        self._require(("vision_proj.", "text_proj.", "itm_head."), "ITC and ITM")
        text = self.extract_text(texts)
        itc, itm = [], []
        for features in self._image_embeds(images):
            context = self.qformer.image_context(features)
            itc.append(self._itc_rows(context, text.proj))
            itm.append(self._itm_rows(context, text.input_ids, text.attention_mask))
        return torch.cat(itc), torch.cat(itm)

    @torch.no_grad()
    def caption(self, images: Images, *, max_new_tokens: int = 30, num_beams: int = 1, **kwargs: Any) -> list[str]:
        """Captions decoded by the Q-Former itself over the image's query cache (ITG); see generate.caption."""
        from blip2_fast.generate import caption

        self._require(("lm_head.",), "captioning")
        kwargs.update(max_new_tokens=max_new_tokens, num_beams=num_beams)
        return [
            text
            for features in self._image_embeds(images)
            for text in caption(self.qformer, features, self.tokenizer, **kwargs)
        ]


# -------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``python -m blip2_fast.stage1 --model RUN --images a.jpg b.jpg [--texts "a cat" "a dog"] [--caption]``."""
    import argparse

    parser = argparse.ArgumentParser(description="Score images against texts, or caption them, with a stage-1 model.")
    parser.add_argument("--model", required=True, help="run folder, model.safetensors, transformers folder or .pth")
    parser.add_argument("--images", nargs="+", required=True, help="image files")
    parser.add_argument("--texts", nargs="*", default=[], help="texts to score against every image")
    parser.add_argument("--caption", action="store_true", help="also caption each image (beam search)")
    parser.add_argument("--num-beams", type=int, default=3)
    parser.add_argument("--backend", default=None, help="attention backend (default: the checkpoint's)")
    parser.add_argument(
        "--vision", default=None, help="ViT weights replacing the model's (a LAVIS .pth holds none: eva_vit_g.pth)"
    )
    parser.add_argument(
        "--num-heads", type=int, default=None, help="Q-Former attention heads of a LAVIS .pth (shapes cannot tell)"
    )
    args = parser.parse_args(argv)
    if not args.texts and not args.caption:
        parser.error("give --texts to score, --caption, or both")

    vision = vision_weights(args.vision) if args.vision else None
    model = Blip2Stage1.from_pretrained(
        args.model, vision=vision, backend=args.backend, num_attention_heads=args.num_heads
    )
    model.to_device("cuda" if torch.cuda.is_available() else "cpu")
    result: dict[str, Any] = {}
    if args.texts:
        pixels = model.pixels(args.images)
        itc, itm = model.score_matrices(pixels, args.texts)
        result.update(itc=itc.cpu(), itm=itm.cpu())
        width = max(len(t) for t in args.texts)
        for i, path in enumerate(args.images):
            print(path)
            for t, text in enumerate(args.texts):
                print(f"  {text:{width}}  itc {itc[i, t].item():+.3f}  itm {itm[i, t].item():.3f}")
    if args.caption:
        result["captions"] = model.caption(args.images, num_beams=args.num_beams)
        for path, text in zip(args.images, result["captions"], strict=True):
            print(f"{path}: {text}")
    return result


if __name__ == "__main__":
    from blip2_fast.cli import run_main

    run_main(main)
