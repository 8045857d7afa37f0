"""ImageReward (Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for Text-to-Image
Generation"): BLIP's ViT-L/16 image encoder, BLIP's BERT-base text encoder whose every layer cross-attends to the
image tokens, and an MLP head on the text [CLS] feature, normalized by the training set's reward mean and std
(THUDM/ImageReward, ImageReward/ImageReward.py: ``ImageReward.score``):

    reward = (MLP(text_encoder(prompt, image_encoder(image))[:, 0]) - MEAN) / STD

The encoders are transformers' BLIP classes (BlipVisionModel; BlipTextModel, the port of BLIP's med.py BertModel);
the released ``ImageReward.pt`` is read in its own key layout: ``blip.visual_encoder.*`` (timm-style ViT names,
mapped here to BlipVisionModel's), ``blip.text_encoder.*`` (med.py names, which BlipTextModel keeps) and
``mlp.layers.{0,2,4,6,7}.*``. The prompt is tokenized by bert-base-uncased's tokenizer with BLIP's two added tokens
([DEC], [ENC]: vocabulary 30524), padded to 35 tokens (``eval.rewards.imagereward_tokenizer``: its local folder).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from onestep.errors import ConfigError
from onestep.rewards.clip import weights_file
from onestep.rewards.preprocess import to_model_input

#: the training set's reward statistics the released scorer normalizes by (ImageReward.py)
MEAN, STD = 0.16717362830052426, 1.0333394966054072
#: ImageReward.py's tokenizer call: padding="max_length", truncation=True, max_length=35
MAX_TOKENS = 35
#: parts of the released checkpoint that scoring does not use (BLIP's contrastive projections)
UNUSED = ("blip.vision_proj.", "blip.text_proj.")


@dataclass(frozen=True)
class Arch:
    """The architecture; the defaults are the released model's (BLIP's create_vit('large', 224), med_config.json)."""

    image_size: int = 224
    patch_size: int = 16
    vision_width: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    text_width: int = 768
    text_layers: int = 12
    text_heads: int = 12
    text_intermediate: int = 3072
    vocab_size: int = 30524
    max_positions: int = 512


def head(width: int = 768) -> nn.Sequential:
    """ImageReward.py's MLP: Linear layers width (768) -> 1024 -> 128 -> 64 -> 16 -> 1 with dropouts between (no
    activations; indices 0, 2, 4, 6, 7 hold the weights)."""
    return nn.Sequential(nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))


def vision_key(key: str) -> str:
    """A key of BLIP's ViT (``blip.visual_encoder.<k>``, timm's names) -> BlipVisionModel's."""
    k = key.removeprefix("blip.visual_encoder.")
    fixed = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
             "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
             "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
             "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
    if k in fixed:
        return fixed[k]
    m = re.fullmatch(r"blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)", k)
    if m is None:
        raise KeyError(key)
    part = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
            "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}[m.group(2)]
    return f"encoder.layers.{m.group(1)}.{part}.{m.group(3)}"


class ImageReward(nn.Module):
    """``ImageReward(arch)`` with random weights; ``ImageReward.load(path, tokenizer)`` the released scorer;
    ``model(images, prompts)`` -> one reward per image (differentiable in the images)."""

    def __init__(self, arch: Arch = Arch(), tokenizer=None):
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        super().__init__()
        self.arch, self.tokenizer = arch, tokenizer
        self.vision = BlipVisionModel(BlipVisionConfig(
            hidden_size=arch.vision_width, intermediate_size=4 * arch.vision_width, num_hidden_layers=arch.vision_layers,
            num_attention_heads=arch.vision_heads, image_size=arch.image_size, patch_size=arch.patch_size,
            hidden_act="gelu", layer_norm_eps=1e-6))  # BLIP's ViT: nn.GELU, LayerNorm(eps=1e-6)
        # med_config.json: BERT-base with cross-attention in every layer to the ViT's width
        self.text = BlipTextModel(BlipTextConfig(
            vocab_size=arch.vocab_size, hidden_size=arch.text_width, encoder_hidden_size=arch.vision_width,
            intermediate_size=arch.text_intermediate, num_hidden_layers=arch.text_layers,
            num_attention_heads=arch.text_heads, max_position_embeddings=arch.max_positions, hidden_act="gelu",
            layer_norm_eps=1e-12, is_decoder=True, pad_token_id=0, bos_token_id=None, eos_token_id=None,
            sep_token_id=None), add_pooling_layer=False)  # token ids: the tokenizer's business
        self.mlp = head(arch.text_width)

    def load_released(self, state: dict[str, torch.Tensor], key: str = "eval.rewards.imagereward") -> None:
        """Load a state dict in the released checkpoint's layout (every weight the scorer uses must be there)."""
        ours = {}
        for k, v in state.items():
            if k.startswith(UNUSED) or k.endswith("embeddings.position_ids"):  # a buffer torch once saved
                continue
            if k.startswith("blip.visual_encoder."):
                try:
                    ours[f"vision.{vision_key(k)}"] = v
                except KeyError:
                    raise ConfigError(f"{key}: '{k}' is not a key of BLIP's ViT; pass the released ImageReward.pt") \
                        from None
            elif k.startswith("blip.text_encoder."):
                ours[f"text.{k.removeprefix('blip.text_encoder.')}"] = v
            elif k.startswith("mlp.layers."):
                ours[f"mlp.{k.removeprefix('mlp.layers.')}"] = v
            else:
                raise ConfigError(f"{key}: '{k}' is not a key of ImageReward's released checkpoint; pass ImageReward.pt")
        try:
            self.load_state_dict(ours)
        except RuntimeError as e:
            raise ConfigError(f"{key}: the weights do not fit ImageReward's architecture "
                              f"({str(e).strip().splitlines()[0]}); pass the released ImageReward.pt") from None

    @classmethod
    def load(cls, checkpoint, tokenizer, arch: Arch = Arch(), key: str = "eval.rewards.imagereward") -> "ImageReward":
        from transformers import BertTokenizer

        path = weights_file(checkpoint, key, "ImageReward")
        folder = Path(tokenizer) if tokenizer else None
        if folder is None or not (folder / "vocab.txt").is_file():
            raise ConfigError(f"{key}_tokenizer '{tokenizer}' is not a bert-base-uncased tokenizer folder (with "
                              f"vocab.txt); pass {key}_tokenizer=<local folder of bert-base-uncased>")
        tok = BertTokenizer.from_pretrained(str(folder))
        # BLIP's init_tokenizer: [DEC] as bos, [ENC] as an extra special token (vocabulary 30522 -> 30524)
        tok.add_special_tokens({"bos_token": "[DEC]"})
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        model = cls(arch, tok)
        model.load_released(torch.load(path, map_location="cpu", weights_only=True), key)
        return model.eval().requires_grad_(False)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        device = next(self.parameters()).device
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS,
                                return_tensors="pt").to(device)
        return self.reward(to_model_input(images.to(device), self.arch.image_size), tokens.input_ids,
                           tokens.attention_mask)

    def reward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The reward of preprocessed images and tokenized prompts (ImageReward.score after its preprocessing)."""
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=pixels.device)
        text = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                         encoder_attention_mask=image_atts, is_decoder=False).last_hidden_state
        return ((self.mlp(text[:, 0].float()) - MEAN) / STD).squeeze(-1)
