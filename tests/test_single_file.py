"""onestep.export.single_file: a diffusers SD 1.5 / SDXL pipeline folder -> one original-layout safetensors
file that diffusers' own ``from_single_file`` loads back bit-identical (tiny random models, no hub)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sd_fixtures import MAX_TOKENS, TEXT_DIM, TOKENS, make_tiny_sd15, scheduler, text_encoder, tokenizer, unet, vae

from onestep.errors import ConfigError
from onestep.export.single_file import write_single_file

#: SDXL's second text encoder must differ in width from the first: diffusers' single-file loader tells the two
#: CLIPs apart only by their position-embedding width (768 vs 1280 in the real model). Ten layers, so the file
#: carries conditioner.embedders.1.model.transformer.resblocks.9.*, the key diffusers detects SDXL by.
TEXT2_DIM, TEXT2_LAYERS = 48, 10
PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}


def make_sdxl(folder: Path) -> Path:
    """An SDXL-style folder like sd_fixtures.make_tiny_sdxl but with a 48-wide, 10-layer second encoder
    (projection_dim 32, so the pooled text stays TEXT_DIM wide as the fixture UNet expects)."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    config2 = CLIPTextConfig(hidden_size=TEXT2_DIM, num_hidden_layers=TEXT2_LAYERS, num_attention_heads=2,
                             intermediate_size=37, max_position_embeddings=MAX_TOKENS, vocab_size=len(TOKENS),
                             projection_dim=TEXT_DIM, bos_token_id=len(TOKENS) - 2, eos_token_id=len(TOKENS) - 1,
                             pad_token_id=len(TOKENS) - 1)
    pipe = StableDiffusionXLPipeline(
        unet=unet(TEXT_DIM + TEXT2_DIM, sdxl=True), vae=vae(), text_encoder=text_encoder(),
        text_encoder_2=CLIPTextModelWithProjection(config2), tokenizer=tokenizer(folder / "tokenizer"),
        tokenizer_2=tokenizer(folder / "tokenizer_2"), scheduler=scheduler())
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def loaded(request, tmp_path_factory):
    """(kind, folder, file, pipeline from_pretrained(folder), pipeline from_single_file(file, config=folder))."""
    import diffusers

    kind = request.param
    folder = tmp_path_factory.mktemp(kind)
    (make_tiny_sd15 if kind == "sd15" else make_sdxl)(folder)
    path = write_single_file(folder, kind)
    cls = getattr(diffusers, PIPELINES[kind])
    reference = diffusers.DiffusionPipeline.from_pretrained(str(folder))
    single = cls.from_single_file(str(path), config=str(folder), local_files_only=True)
    return kind, folder, path, reference, single


def test_writes_one_original_layout_file(loaded):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type
    from safetensors.torch import load_file

    kind, folder, path, _, _ = loaded
    assert path == folder / "model.safetensors"
    sd = load_file(str(path))
    prefixes = {"model.diffusion_model.", "first_stage_model.",
                *(("cond_stage_model.transformer.text_model.",) if kind == "sd15" else
                  ("conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model."))}
    assert all(k.startswith(tuple(prefixes)) for k in sd)
    assert all(any(k.startswith(p) for k in sd) for p in prefixes)
    assert infer_diffusers_model_type(sd) == {"sd15": "v1", "sdxl": "xl_base"}[kind]
    # spot checks of the original layout's shapes
    assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv, not Linear
    assert "model.diffusion_model.out.2.weight" in sd and "model.diffusion_model.time_embed.0.weight" in sd
    if kind == "sdxl":
        g = "conditioner.embedders.1.model."
        assert sd[g + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * TEXT2_DIM, TEXT2_DIM)
        assert sd[g + "text_projection"].shape == (TEXT2_DIM, TEXT_DIM)
        assert "model.diffusion_model.label_emb.0.0.weight" in sd


def test_single_file_loads_bit_identical_weights(loaded):
    kind, _, _, reference, single = loaded
    names = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if kind == "sdxl" else [])
    for name in names:
        want, got = getattr(reference, name).state_dict(), getattr(single, name).state_dict()
        assert type(getattr(reference, name)) is type(getattr(single, name))
        assert set(got) == set(want), name
        for key, value in want.items():
            assert not got[key].is_meta, f"{name}.{key} was not loaded"
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), f"{name}.{key} differs"


def own_memory(pipe):
    """Every weight copied into freshly allocated memory. Both loaders leave tensors as views into the
    memory-mapped safetensors files, and CPU kernels round differently on data that is not 16-byte aligned,
    so without this the comparison would hinge on where each file happened to put its tensors."""
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, name, None)
        for p in model.parameters() if model is not None else ():
            p.data = p.data.clone()
    return pipe


def test_single_file_generates_the_same_image(loaded):
    _, _, _, reference, single = loaded
    images = [own_memory(pipe)("a red 7", num_inference_steps=1, guidance_scale=1.0, height=16, width=16,
                               output_type="pt", generator=torch.Generator().manual_seed(0)).images
              for pipe in (reference, single)]
    assert images[0].shape == (1, 3, 16, 16)
    assert torch.equal(images[0], images[1])


def test_user_errors_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="sd21"):
        write_single_file(tmp_path, "sd21")
    with pytest.raises(ConfigError, match="not a folder"):
        write_single_file(tmp_path / "nope", "sd15")
    (tmp_path / "unet").mkdir()
    with pytest.raises(ConfigError, match=r"vae' is missing"):
        write_single_file(tmp_path, "sd15")
    (tmp_path / "vae").mkdir()
    (tmp_path / "text_encoder").mkdir()
    with pytest.raises(ConfigError, match="no safetensors weights"):
        write_single_file(tmp_path, "sd15")


def meta_models(kind: str) -> dict:
    """The real SD 1.5 / SDXL architectures (their published configs) on the meta device: shapes, no memory."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            max_position_embeddings=77, vocab_size=49408, projection_dim=768)
    with torch.device("meta"):
        models = {"vae": AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                       down_block_types=("DownEncoderBlock2D",) * 4, latent_channels=4,
                                       up_block_types=("UpDecoderBlock2D",) * 4),
                  "text_encoder": CLIPTextModel(clip_l)}
        if kind == "sd15":
            models["unet"] = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
        else:
            models["unet"] = UNet2DConditionModel(
                sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816)
            models["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(
                hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                max_position_embeddings=77, vocab_size=49408, projection_dim=1280, hidden_act="gelu"))
    return models


#: keys every original checkpoint of the kind has (SD 1.5: v1-5-pruned; SDXL: sd_xl_base_1.0), with shapes
ORIGINAL_KEYS = {
    "sd15": {"model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
             "model.diffusion_model.input_blocks.8.1.proj_in.weight": (1280, 1280, 1, 1),
             "model.diffusion_model.input_blocks.11.0.in_layers.2.weight": (1280, 1280, 3, 3),
             "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
             "model.diffusion_model.middle_block.2.emb_layers.1.weight": (1280, 1280),
             "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
             "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
             "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
             "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
             "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
             "model.diffusion_model.time_embed.2.weight": (1280, 1280),
             "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
             "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
             "cond_stage_model.transformer.text_model.embeddings.position_ids": (1, 77)},
    "sdxl": {"model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
             "model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
             "model.diffusion_model.input_blocks.8.1.proj_in.weight": (1280, 1280),
             "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
             "model.diffusion_model.middle_block.1.transformer_blocks.9.norm3.bias": (1280,),
             "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
             "model.diffusion_model.output_blocks.5.2.conv.weight": (640, 640, 3, 3),
             "model.diffusion_model.output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
             "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
             "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
             "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,),
             "conditioner.embedders.1.model.positional_embedding": (77, 1280),
             "conditioner.embedders.1.model.text_projection": (1280, 1280)},
}
#: the VAE's, shared by both
ORIGINAL_VAE_KEYS = {"first_stage_model.encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
                     "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
                     "first_stage_model.encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
                     "first_stage_model.encoder.norm_out.weight": (512,),
                     "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
                     "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
                     "first_stage_model.decoder.up.3.block.2.conv2.weight": (512, 512, 3, 3),
                     "first_stage_model.decoder.mid.block_2.norm2.bias": (512,),
                     "first_stage_model.post_quant_conv.weight": (4, 4, 1, 1)}


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_real_architectures_map_to_the_original_keys_and_back(kind):
    """At the real sizes (meta tensors): the original key names and shapes, diffusers' model-type detection,
    and diffusers' own converters mapping every key back onto the model's. Catches what the tiny models
    cannot tell apart (e.g. an upsampler after attention, which diffusers' loader also finds at the wrong index)."""
    from diffusers.loaders import single_file_utils as U

    from onestep.export import single_file as S

    models = meta_models(kind)
    ckpt = {}
    for name, prefix, convert in [("unet", S.UNET_PREFIX, S.unet_to_ldm), ("vae", S.VAE_PREFIX, S.vae_to_ldm)]:
        ckpt.update({prefix + k: v for k, v in
                     convert(models[name].state_dict(), dict(models[name].config), Path(name)).items()})
    ckpt.update({S.single_file_kinds()[kind].clip_prefix + k: v for k, v in
                 S.clip_to_ldm(models["text_encoder"].state_dict(), Path("te")).items()})
    if kind == "sdxl":
        ckpt.update({S.OPEN_CLIP_PREFIX + k: v for k, v in
                     S.clip_to_open_clip(models["text_encoder_2"].state_dict(), Path("te2")).items()})
    for key, shape in {**ORIGINAL_KEYS[kind], **ORIGINAL_VAE_KEYS}.items():
        assert key in ckpt and tuple(ckpt[key].shape) == shape, key
    assert U.infer_diffusers_model_type(ckpt) == {"sd15": "v1", "sdxl": "xl_base"}[kind]

    back = {"unet": U.convert_ldm_unet_checkpoint(ckpt, dict(models["unet"].config)),
            "vae": U.convert_ldm_vae_checkpoint(ckpt, dict(models["vae"].config)),
            "text_encoder": {k.removeprefix("text_model."): v for k, v in U.convert_ldm_clip_checkpoint(ckpt).items()}}
    if kind == "sdxl":
        back["text_encoder_2"] = U.convert_open_clip_checkpoint(models["text_encoder_2"], ckpt,
                                                                prefix=S.OPEN_CLIP_PREFIX)
    for name, converted in back.items():
        want = models[name].state_dict()
        assert set(want) <= set(converted), (name, sorted(set(want) - set(converted))[:3])
        assert all(converted[k].shape == v.shape for k, v in want.items()), name


def test_sdxl_encoders_of_one_width_warn(tmp_path):
    """sd_fixtures.make_tiny_sdxl's two encoders are both 32 wide: the file is right, but diffusers' loader
    would fill text_encoder_2 from text_encoder's weights, so writing it warns."""
    from sd_fixtures import make_tiny_sdxl

    make_tiny_sdxl(tmp_path)
    with pytest.warns(UserWarning, match="both 32 wide"):
        assert write_single_file(tmp_path, "sdxl").is_file()
