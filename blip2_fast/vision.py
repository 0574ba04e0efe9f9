"""The frozen image encoder: EVA ViT-g in transformers' Blip2VisionModel layout.

BLIP-2 feeds the Q-Former the ViT's last hidden states *before* any final norm;
its own trainable ``ln_vision`` (in :class:`blip2_fast.qformer.QFormer`) plays
that role, so the wrapped model's ``post_layernorm`` is replaced by an identity
(a transformers checkpoint's ``post_layernorm`` maps onto ``ln_vision``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Blip2VisionConfig, Blip2VisionModel

from blip2_fast.config import VisionConfig


def hf_vision_config(config: VisionConfig) -> Blip2VisionConfig:
    return Blip2VisionConfig(
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
        layer_norm_eps=config.layer_norm_eps,
        qkv_bias=config.qkv_bias,
    )


class ImageEncoder(nn.Module):
    """The ViT: frozen by default (always eval mode, no gradients, half precision on GPU); :meth:`unfreeze`
    makes it trainable, as BLIP-2's fine-tuning recipes do.

    ``forward(pixels (B, 3, S, S)) -> (B, N, E)`` features, N = (S / patch)^2 + 1.
    """

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.frozen = True
        self.vit = Blip2VisionModel(hf_vision_config(config))
        self.vit.post_layernorm = nn.Identity()
        self.reset_parameters()
        self.freeze()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A usable random ViT: N(0, 0.02) weights, zero biases, unit norms.

        transformers starts Blip2VisionModel at its initializer_range, 1e-10 (meant to be
        overwritten by pretrained weights), where every image gives the same features.
        Loading weights replaces all of this.
        """
        for name, p in self.vit.named_parameters():
            if "norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                nn.init.trunc_normal_(p, std=0.02)

    def freeze(self) -> ImageEncoder:
        self.frozen = True
        self.requires_grad_(False)
        return self.eval()

    def unfreeze(self, grad_checkpoint: bool = False) -> ImageEncoder:
        """Trainable from here on; ``grad_checkpoint`` recomputes each block's activations in the backward
        (what LAVIS does for EVA ViT-g at 364 px, whose activations would not fit otherwise)."""
        self.frozen = False
        self.requires_grad_(True)
        # transformers 5 renamed gradient_checkpointing_* to activation_checkpointing_*
        enable = getattr(self.vit, "activation_checkpointing_enable", self.vit.gradient_checkpointing_enable)
        disable = getattr(self.vit, "activation_checkpointing_disable", self.vit.gradient_checkpointing_disable)
        if grad_checkpoint:
            enable()
        else:
            disable()
        return self

    def train(self, mode: bool = True) -> ImageEncoder:
        return super().train(mode and not self.frozen)  # frozen: dropout and the like stay off

    def to_device(self, device: torch.device | str) -> ImageEncoder:
        """Move to ``device``; on GPU also cast a frozen encoder to half precision when the config asks for it
        (a trainable one keeps fp32 weights: its precision is the training's)."""
        device = torch.device(device)
        dtype = torch.float32
        if device.type == "cuda" and self.config.half_precision and self.frozen:
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return self.to(device=device, dtype=dtype)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if pixels.dim() != 4 or pixels.shape[1:] != (3, size, size):
            raise ValueError(f"pixels must have shape (B, 3, {size}, {size}), got {tuple(pixels.shape)}")
        dtype = self.vit.embeddings.patch_embedding.weight.dtype
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self.vit(pixel_values=pixels.to(dtype)).last_hidden_state
