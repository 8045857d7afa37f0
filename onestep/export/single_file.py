"""A diffusers SD 1.x / SDXL pipeline folder -> ONE safetensors file in the original (CompVis/LDM, Stability
"generative-models") layout, the file A1111, ComfyUI and ``from_single_file`` read:

    model.diffusion_model.*                 the UNet        (input_blocks / middle_block / output_blocks / out)
    first_stage_model.*                     the VAE         (encoder/decoder .down/.mid/.up, 1x1-conv attention)
    cond_stage_model.transformer.text_model.*          SD 1.x: the CLIP text encoder (transformers layout)
    conditioner.embedders.0.transformer.text_model.*   SDXL: the first CLIP text encoder (transformers layout)
    conditioner.embedders.1.model.*                    SDXL: the second one in OpenCLIP layout (fused in_proj,
                                                       resblocks, (hidden, proj) text_projection)

The mapping is the inverse of diffusers' ``loaders/single_file_utils.py`` (convert_ldm_unet_checkpoint,
convert_ldm_vae_checkpoint, convert_ldm_clip_checkpoint, convert_open_clip_checkpoint), worked out from the
folder's own configs (number of blocks, ``layers_per_block``), so it holds for any size. Every weight of the
folder is mapped; one with no place in the layout is an error, never silently dropped. (An SD 2.x folder,
kind sd15, gets its text encoder in the transformers layout too: diffusers loads that, but it is not SD 2's
original OpenCLIP ``cond_stage_model.model.*`` layout.)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from onestep import teachers
from onestep.errors import ConfigError

OUT_NAME = "model.safetensors"
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
NO_FILE = "pass single_file=false to export without the single file"

#: diffusers ResnetBlock2D part -> LDM ResBlock part (UNet)
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
#: whole-module renames (UNet)
UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
              "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
              "class_embedding": "label_emb"}
#: diffusers VAE attention part -> LDM AttnBlock part (q/k/v/proj_out are 1x1 convs there)
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
#: diffusers CLIP encoder-layer part -> OpenCLIP resblock part (q/k/v are fused into attn.in_proj_*)
OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def write_single_file(folder: Path, kind: str) -> Path:
    """Write ``folder/model.safetensors``: the pipeline folder's UNet, VAE and text encoder(s) in the original
    single-file layout, and return its path. Load it back, offline, with

        StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
        StableDiffusionXLPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)

    ``config=<the local folder>`` is what keeps diffusers off the hub (it then reads every component's
    config, the tokenizers and the scheduler from the folder); ``local_files_only=True`` only makes sure.
    Without ``config`` diffusers guesses the model type from the keys (``infer_diffusers_model_type``: "v1"
    for SD 1.x, "xl_base" for SDXL, which needs a second text encoder of >= 10 layers) and downloads the
    matching stock configs. Tensors keep the folder's dtype; the weights load back bit-identical. SDXL
    caveat: diffusers' loader tells the two text encoders apart by width only, so a folder whose encoders
    are equally wide warns (the real 768 / 1280 are fine).
    """
    folder = Path(folder)
    rules = single_file_kinds()
    if kind not in rules:
        raise ConfigError(f"kind '{kind}' has no single-file layout here; pass one of {sorted(rules)}")
    rule, pipeline = rules[kind], teachers.family(kind).pipeline(kind)
    subs = rule.subfolders
    if not folder.is_dir():
        raise ConfigError(f"'{folder}' is not a folder; pass a {pipeline}.save_pretrained folder")
    for sub in subs:  # every missing part named before any weights are read
        if not (folder / sub).is_dir():
            raise ConfigError(f"'{folder / sub}' is missing; pass a complete {pipeline}.save_pretrained folder "
                              f"(with {'/, '.join(subs)}/)")
    weights = {sub: _load_weights(folder, sub, pipeline) for sub in subs}
    configs = {sub: _load_config(folder, sub, pipeline) for sub in ("unet", "vae")}

    state: dict[str, torch.Tensor] = {}
    _merge(state, UNET_PREFIX, unet_to_ldm(weights["unet"], configs["unet"], folder / "unet"))
    _merge(state, VAE_PREFIX, vae_to_ldm(weights["vae"], configs["vae"], folder / "vae"))
    _merge(state, rule.clip_prefix, clip_to_ldm(weights["text_encoder"], folder / "text_encoder"))
    if rule.open_clip:
        _merge(state, OPEN_CLIP_PREFIX, clip_to_open_clip(weights["text_encoder_2"], folder / "text_encoder_2"))
        _warn_same_width(state, rule.clip_prefix, folder)

    out = folder / OUT_NAME
    tmp = folder / f".{OUT_NAME}.tmp"
    save_aligned(state, tmp, metadata={"format": "pt"})
    tmp.replace(out)
    return out


def single_file_kinds() -> dict:
    """teacher kind -> its family's single-file rule (teachers.SingleFile), for the kinds that have one."""
    return {k: teachers.family(k).single_file[k] for k in teachers.kinds() if k in teachers.family(k).single_file}


def _warn_same_width(state: dict[str, torch.Tensor], clip_prefix: str, folder: Path) -> None:
    """diffusers' single-file loader picks the weights of each SDXL text encoder by the position-embedding
    width (768 vs 1280 in SDXL); with equal widths it fills text_encoder_2 from text_encoder's weights. The
    file itself is right (A1111 / ComfyUI go by the key names), so this only warns."""
    import warnings

    first = state[clip_prefix + "text_model.embeddings.position_embedding.weight"].shape[-1]
    second = state[OPEN_CLIP_PREFIX + "positional_embedding"].shape[-1]
    if first == second:
        warnings.warn(f"'{folder}': text_encoder and text_encoder_2 are both {first} wide; diffusers' "
                      "from_single_file tells them apart by width and will load text_encoder_2 wrongly from this "
                      "file (pass text_encoder_2=... to from_single_file, or load the folder with from_pretrained)",
                      stacklevel=3)


# ---------------------------------------------------------------------------------------------- writing

ALIGN = 64
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def save_aligned(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """A plain safetensors file whose tensors start on 64-byte boundaries wherever the sizes allow.

    ``from_single_file`` keeps the tensors as views into the memory-mapped file, and CPU kernels round
    differently on data that is not 16-byte aligned (safetensors' own writer packs tensors by dtype and name,
    so one odd-sized tensor shifts everything after it): the loaded pipeline then differs from
    ``from_pretrained``'s in the last bit. Here the header is padded to a multiple of 64 bytes and the tensors
    are ordered by the alignment their byte size allows (multiples of 64 first: all of a real SD model's but
    ``position_ids``; then 32, 16, ...), so each starts as aligned as its size permits; the buffer has no
    holes, as the format requires."""
    import struct

    def nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    for key, t in state.items():
        if t.dtype not in SAFETENSORS_DTYPES:
            raise ConfigError(f"weight '{key}' has dtype {t.dtype}, which this writer does not store; {NO_FILE}")
    def alignment(t: torch.Tensor) -> int:  # the largest power of two (<= ALIGN) dividing the byte size
        n = nbytes(t)
        return ALIGN if n % ALIGN == 0 else n & -n

    order = sorted(state, key=lambda k: (-alignment(state[k]), k))
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for key in order:
        t = state[key]
        header[key] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + nbytes(t)]}
        offset += nbytes(t)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key in order:
            t = state[key].detach().cpu().contiguous().reshape(-1)
            if t.numel():
                f.write(memoryview(t.view(torch.uint8).numpy()))


# ---------------------------------------------------------------------------------------------- reading

def _load_config(folder: Path, sub: str, pipeline: str) -> dict:
    path = folder / sub / "config.json"
    if not path.is_file():
        raise ConfigError(f"'{path}' is missing; pass a folder written by {pipeline}.save_pretrained")
    return json.loads(path.read_text(encoding="utf-8"))


def _load_weights(folder: Path, sub: str, pipeline: str) -> dict[str, torch.Tensor]:
    """A subfolder's safetensors weights (one file or an index of shards; the non-variant ones first)."""
    from safetensors.torch import load_file

    d = folder / sub
    indexes = sorted(d.glob("*.safetensors.index.json"), key=lambda p: (len(p.name), p.name))
    if indexes:
        shards = sorted(set(json.loads(indexes[0].read_text(encoding="utf-8"))["weight_map"].values()))
        paths = [d / s for s in shards]
    else:
        paths = sorted(d.glob("*.safetensors"), key=lambda p: (len(p.name), p.name))[:1]
    if not paths or not all(p.is_file() for p in paths):
        raise ConfigError(f"'{d}' has no safetensors weights; save the pipeline with "
                          f"{pipeline}.save_pretrained(..., safe_serialization=True)")
    weights: dict[str, torch.Tensor] = {}
    for p in paths:
        weights.update(load_file(str(p)))
    return weights



def _merge(state: dict, prefix: str, part: dict) -> None:
    for k, v in part.items():
        state[prefix + k] = v


def _unmapped(where: Path, keys) -> ConfigError:
    keys = sorted(keys)
    shown = ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
    return ConfigError(f"'{where}' has weights with no place in the original single-file layout ({shown}); "
                       f"{NO_FILE}")


def _put(out: dict, key: str, value: torch.Tensor, where: Path) -> None:
    if key in out:  # two weights on one original key: the layout cannot hold this model
        raise ConfigError(f"'{where}' maps two weights onto the original key '{key}'; {NO_FILE}")
    out[key] = value


# ---------------------------------------------------------------------------------------------- UNet

def unet_to_ldm(sd: dict[str, torch.Tensor], config: dict, where: Path) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel keys -> LDM ``openaimodel.UNetModel`` keys (without the prefix).

    LDM numbers the encoder as one flat list: input_blocks.0 is conv_in, then per down block
    ``layers_per_block`` entries [ResBlock, SpatialTransformer?] and, unless it is the last block, one
    Downsample entry (``.0.op``). The decoder likewise: per up block ``layers_per_block + 1`` entries
    [ResBlock, SpatialTransformer?, Upsample?] with the Upsample on the block's last entry (at ``.1`` without
    attention, ``.2`` with). The middle block is [ResBlock, SpatialTransformer, ResBlock]."""
    lpb = config.get("layers_per_block")
    if isinstance(lpb, (list, tuple)) and len(set(lpb)) == 1:
        lpb = lpb[0]
    if not isinstance(lpb, int):
        raise ConfigError(f"'{where}/config.json' has layers_per_block={lpb!r}; the original layout (and diffusers' "
                          f"single-file loader) needs one number for every block; {NO_FILE}")
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid not in ("UNetMidBlock2DCrossAttn", None):
        raise ConfigError(f"'{where}/config.json' has mid_block_type={mid!r}; the original layout holds "
                          f"UNetMidBlock2DCrossAttn (or none); {NO_FILE}")
    per = lpb + 1
    attn_up = {int(m.group(1)) for k in sd if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out: dict[str, torch.Tensor] = {}
    left = []
    for key, value in sd.items():
        new = _unet_key(key, per, attn_up)
        if new is None:
            left.append(key)
        else:
            _put(out, new, value, where)
    if left:
        raise _unmapped(where, left)
    if any(k.startswith("middle_block.") and int(k.split(".")[1]) > 2 for k in out):
        raise ConfigError(f"'{where}' has a middle block with more than one attention layer; the original layout "
                          f"holds one; {NO_FILE}")
    return out


def _unet_key(key: str, per: int, attn_up: set[int]) -> str | None:
    module, _, param = key.rpartition(".")
    if module in UNET_FIXED:
        return f"{UNET_FIXED[module]}.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module):
        b, j, part = int(m.group(1)), int(m.group(2)), m.group(3)
        return f"input_blocks.{1 + b * per + j}.0.{UNET_RESNET[part]}.{param}" if part in UNET_RESNET else None
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        b, j = int(m.group(1)), int(m.group(2))
        return f"input_blocks.{1 + b * per + j}.1.{m.group(3)}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
        return f"input_blocks.{1 + int(m.group(1)) * per + per - 1}.0.op.{param}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(\w+)", module):
        part = m.group(2)
        return f"middle_block.{2 * int(m.group(1))}.{UNET_RESNET[part]}.{param}" if part in UNET_RESNET else None
    if m := re.fullmatch(r"mid_block\.attentions\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m.group(1)) + 1}.{m.group(2)}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module):
        b, j, part = int(m.group(1)), int(m.group(2)), m.group(3)
        return f"output_blocks.{b * per + j}.0.{UNET_RESNET[part]}.{param}" if part in UNET_RESNET else None
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        b, j = int(m.group(1)), int(m.group(2))
        return f"output_blocks.{b * per + j}.1.{m.group(3)}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
        b = int(m.group(1))
        return f"output_blocks.{b * per + per - 1}.{2 if b in attn_up else 1}.conv.{param}"
    return None


# ---------------------------------------------------------------------------------------------- VAE

def vae_to_ldm(sd: dict[str, torch.Tensor], config: dict, where: Path) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> LDM ``AutoencoderKL`` keys (without the prefix). The decoder's up blocks
    are numbered in reverse there (up.{n-1} runs first), its attention is 1x1 convs and ``nin_shortcut``."""
    n_up = len(config["up_block_types"])
    out: dict[str, torch.Tensor] = {}
    left = []
    for key, value in sd.items():
        new = _vae_key(key, n_up)
        if new is None:
            left.append(key)
            continue
        if re.search(r"\.mid\.attn_\d+\.(q|k|v|proj_out)\.weight$", new) and value.ndim == 2:
            value = value[:, :, None, None]  # Linear (out, in) -> Conv2d 1x1 (out, in, 1, 1)
        _put(out, new, value, where)
    if left:
        raise _unmapped(where, left)
    return out


def _vae_key(key: str, n_up: int) -> str | None:
    module, _, param = key.rpartition(".")
    if module in ("quant_conv", "post_quant_conv"):
        return key
    if m := re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|conv_norm_out)", module):
        return f"{m.group(1)}.{'norm_out' if m.group(2) == 'conv_norm_out' else m.group(2)}.{param}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module):
        return f"encoder.down.{m.group(1)}.block.{m.group(2)}.{_vae_resnet(m.group(3))}.{param}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
        return f"encoder.down.{m.group(1)}.downsample.conv.{param}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module):
        return f"decoder.up.{n_up - 1 - int(m.group(1))}.block.{m.group(2)}.{_vae_resnet(m.group(3))}.{param}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
        return f"decoder.up.{n_up - 1 - int(m.group(1))}.upsample.conv.{param}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(\w+)", module):
        return f"{m.group(1)}.mid.block_{int(m.group(2)) + 1}.{_vae_resnet(m.group(3))}.{param}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", module):
        part = VAE_ATTN.get(m.group(2))
        return f"{m.group(1)}.mid.attn_1.{part}.{param}" if part else None
    return None


def _vae_resnet(part: str) -> str:
    return "nin_shortcut" if part == "conv_shortcut" else part


# ---------------------------------------------------------------------------------------------- text encoders

def _text_model_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys under ``text_model.`` whether the file was written by a transformers that wraps CLIPTextModel in
    ``text_model`` or by one (>= 5.6) that flattened it."""
    return {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v for k, v in sd.items()}


def clip_to_ldm(sd: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """CLIPTextModel -> the original layout, which is transformers' own (``text_model.*``) plus the
    ``position_ids`` buffer the original checkpoints carry (diffusers ignores it; older loaders expect it)."""
    out = _text_model_keys(sd)
    pos = out.get("text_model.embeddings.position_embedding.weight")
    if pos is None:
        raise ConfigError(f"'{where}' has no text_model.embeddings.position_embedding.weight; pass a CLIPTextModel "
                          f"saved by save_pretrained")
    out.setdefault("text_model.embeddings.position_ids", torch.arange(pos.shape[0], dtype=torch.int64)[None])
    return out


def clip_to_open_clip(sd: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection -> OpenCLIP ``TextTransformer`` keys (without the prefix): q/k/v fused into
    ``attn.in_proj_weight`` (q, k, v stacked on dim 0), ``text_projection`` as the (hidden, proj) matrix that
    multiplies from the right (the transpose of the Linear weight)."""
    sd = _text_model_keys(sd)
    if "text_projection.weight" not in sd:
        raise ConfigError(f"'{where}' has no text_projection.weight; SDXL's second text encoder is a "
                          f"CLIPTextModelWithProjection")
    fixed = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
             "text_model.embeddings.position_embedding.weight": "positional_embedding",
             "text_model.final_layer_norm.weight": "ln_final.weight",
             "text_model.final_layer_norm.bias": "ln_final.bias"}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    left = []
    for key, value in sd.items():
        if key in fixed:
            _put(out, fixed[key], value, where)
        elif key == "text_projection.weight":
            _put(out, "text_projection", value.T.contiguous(), where)
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)", key):
            qkv.setdefault((int(m.group(1)), m.group(3)), {})[m.group(2)] = value
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            part = OPEN_CLIP_LAYER.get(m.group(2))
            if part is None:
                left.append(key)
            else:
                _put(out, f"transformer.resblocks.{m.group(1)}.{part}.{m.group(3)}", value, where)
        else:
            left.append(key)
    for (layer, param), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            left.extend(f"text_model.encoder.layers.{layer}.self_attn.{p}_proj.{param}" for p in parts)
            continue
        fused = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        _put(out, f"transformer.resblocks.{layer}.attn.in_proj_{param}", fused, where)
    if left:
        raise _unmapped(where, left)
    return out
