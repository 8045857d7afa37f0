"""The Stable Diffusion adapters against diffusers' own computation, on tiny random pipeline folders.

The strongest check runs the diffusers pipeline itself for one DDIM step from timestep 999 to alpha = 1
(``set_alpha_to_one``, trailing spacing, eta 0): the latents it returns are then its x0 estimate at t = 1,
classifier-free guidance and prompt encoding included, and must equal ``Guided(denoiser, w).x0``.
"""

import json
import shutil

import pytest
import torch
from conftest import noise, one_line, rel_err, write_scheduler
from sd_fixtures import make_tiny_sd15, make_tiny_sdxl, vae, write_prompts

from onestep.conditioning import Cond
from onestep.denoisers.base import Guided, guided
from onestep.denoisers.sd import (PREDICTIONS, LatentCodec, TextEncoder, check_pipeline_folder, load_sd,
                                  scheduler_schedule)
from onestep.errors import ConfigError

PROMPTS = ["a red cat", "two blue dogs!"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    return {"sd15": make_tiny_sd15(root / "sd15"), "sdxl": make_tiny_sdxl(root / "sdxl"),
            "sd15_v": make_tiny_sd15(root / "sd15_v", prediction_type="v_prediction")}


def pipeline(folder, kind):
    """The folder's own diffusers pipeline, with a scheduler whose single step returns the x0 estimate."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(str(folder), local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, set_alpha_to_one=True,
                                               timestep_spacing="trailing", clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("name,negative", [("sd15", "blurry"), ("sd15", None), ("sd15_v", "blurry"),
                                           ("sdxl", None), ("sdxl", "blurry")])
@pytest.mark.parametrize("w", [1.0, 3.0])
def test_one_pipeline_step_equals_guided_x0(folders, name, negative, w):
    kind = name[:4]
    pipe, parts = pipeline(folders[name], kind), load_sd(folders[name], kind)
    z = noise()
    ref = pipe(PROMPTS, negative_prompt=None if negative is None else [negative] * 2, num_inference_steps=1,
               guidance_scale=w, eta=0.0, latents=z.clone(), output_type="latent").images
    assert pipe.scheduler.timesteps.tolist() == [999]
    cond = parts.text.cond(PROMPTS, negative, height=parts.image_size, width=parts.image_size)
    x0 = Guided(parts.denoiser, w).x0(z, 1.0, cond)
    # x0 at t = 1 is eps-space rounding amplified by 1/alpha ~ 15, so compare relative to its scale
    assert rel_err(x0, ref) < 1e-5


@pytest.mark.parametrize("name", ["sd15", "sd15_v", "sdxl"])
def test_unet_at_integer_timestep(folders, name):
    """t = k/999 feeds diffusers' timestep k; eps follows diffusers' own conversion from the native output."""
    kind = name[:4]
    pipe, parts = pipeline(folders[name], kind), load_sd(folders[name], kind)
    x, k = noise(seed=2), 500
    embeds, _, *pooled = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    extra = None
    if kind == "sdxl":
        ids = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), torch.float32, text_encoder_projection_dim=32)
        extra = {"text_embeds": pooled[0], "time_ids": ids.repeat(2, 1)}
    with torch.no_grad():
        native = pipe.unet(x, k, encoder_hidden_states=embeds, added_cond_kwargs=extra).sample
    cond = parts.text.cond(PROMPTS, height=16, width=16)
    t = k / 999
    assert torch.equal(parts.denoiser.timestep(torch.tensor([t])), torch.tensor([float(k)]))
    torch.testing.assert_close(parts.denoiser(x, t, cond), native, rtol=1e-5, atol=1e-5)
    ab = pipe.scheduler.alphas_cumprod[k]
    eps = native if name != "sd15_v" else ab.sqrt() * native + (1 - ab).sqrt() * x
    torch.testing.assert_close(parts.denoiser.eps(x, t, cond), eps, rtol=1e-5, atol=1e-5)


def test_sdxl_fields_match_pipeline(folders):
    pipe, text = pipeline(folders["sdxl"], "sdxl"), TextEncoder(folders["sdxl"], "sdxl")
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
    cond = text.cond(PROMPTS, height=16, width=24)
    assert torch.equal(cond["prompt_embeds"], embeds) and torch.equal(cond["pooled_prompt_embeds"], pooled)
    null = cond.null()
    assert torch.equal(null["prompt_embeds"], neg) and torch.equal(null["pooled_prompt_embeds"], neg_pooled)
    assert not null["prompt_embeds"].any()  # force_zeros_for_empty_prompt: no negative prompt -> zeros
    ids = pipe._get_add_time_ids((16, 24), (0, 0), (16, 24), torch.float32, text_encoder_projection_dim=32)
    assert torch.equal(cond["add_time_ids"], ids.repeat(2, 1)) and torch.equal(null["add_time_ids"], ids.repeat(2, 1))
    _, neg, _, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True,
                                             negative_prompt=["ugly"] * 2)
    null = text.cond(PROMPTS, "ugly", height=16, width=24).null()
    # encoded as one row, where the pipeline encodes a batch: equal up to matmul rounding
    torch.testing.assert_close(null["prompt_embeds"], neg, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(null["pooled_prompt_embeds"], neg_pooled, rtol=1e-6, atol=1e-6)


def test_sd15_fields_and_name(folders, tmp_path):
    pipe, text = pipeline(folders["sd15"], "sd15"), TextEncoder(folders["sd15"], "sd15")
    embeds, neg = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
                                   negative_prompt=["blurry"] * 2)
    cond = text.cond(PROMPTS, "blurry")
    assert set(cond.fields) == {"prompt_embeds"} and cond.texts == PROMPTS and cond.null_text == "blurry"
    assert torch.equal(cond["prompt_embeds"], embeds)
    torch.testing.assert_close(cond.null()["prompt_embeds"], neg, rtol=1e-6, atol=1e-6)  # 1 row vs the pipeline's 2
    assert text.time_ids(16, 16) is None
    # text encoders that set use_attention_mask get the tokenizer's mask, as in the pipeline
    masked = shutil.copytree(folders["sd15"], tmp_path / "masked")
    config = json.loads((masked / "text_encoder" / "config.json").read_text())
    (masked / "text_encoder" / "config.json").write_text(json.dumps({**config, "use_attention_mask": True}))
    embeds_masked, _ = pipeline(masked, "sd15").encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                              do_classifier_free_guidance=False)
    assert not torch.allclose(embeds_masked, embeds)
    torch.testing.assert_close(TextEncoder(masked, "sd15").encode(PROMPTS)["prompt_embeds"], embeds_masked)
    # the cache identity is the bytes: a copy has the same name, one changed weight byte another
    copy = shutil.copytree(folders["sd15"], tmp_path / "copy")
    assert TextEncoder(copy, "sd15").name == text.name != TextEncoder(folders["sdxl"], "sdxl").name
    weights = copy / "text_encoder" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert TextEncoder(copy, "sd15").name != text.name


def test_features(folders):
    parts = load_sd(folders["sd15"], "sd15")
    d, x = parts.denoiser, noise()
    f = d.features(x, 0.5, parts.text.cond(PROMPTS))
    assert f.shape == (2, d.feature_dim) and torch.isfinite(f).all()
    assert not torch.allclose(f, d.features(x, 0.5, parts.text.cond(["green", "grass"])))
    out = d(x.double(), 0.5, parts.text.cond(PROMPTS))  # the float32 UNet's output comes back in the input's dtype
    assert out.dtype == torch.float64 and torch.allclose(out.float(), d(x, 0.5, parts.text.cond(PROMPTS)))


def test_latent_codec():
    torch.manual_seed(0)
    model = vae(scaling_factor=0.37).eval()
    codec = LatentCodec(model)
    assert (codec.latent_channels, codec.downsample, codec.scaling, codec.shift) == (4, 2, 0.37, 0.0)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    z = codec.encode(images)
    assert z.shape == (2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(z, model.encode(images).latent_dist.mean * 0.37)
        big = 50 * torch.randn(2, 4, 8, 8)
        raw = model.decode(big / 0.37).sample
    assert raw.abs().max() > 1  # the clamp has something to do
    out = codec.decode(big)
    assert out.shape == (2, 3, 16, 16) and out.min() >= -1 and out.max() <= 1
    torch.testing.assert_close(out, raw.clamp(-1, 1))


def test_latent_codec_shift_and_upcast():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    codec = LatentCodec(vae(scaling_factor=2.0, shift_factor=0.25).eval())
    assert (codec.scaling, codec.shift) == (2.0, 0.25)
    images, z = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(codec.encode(images), (codec.vae.encode(images).latent_dist.mean - 0.25) * 2.0)
        torch.testing.assert_close(codec.decode(z), codec.vae.decode(z / 2.0 + 0.25).sample.clamp(-1, 1))
    half = LatentCodec(vae().half())  # force_upcast (AutoencoderKL's default): the VAE runs in float32
    assert half.dtype == torch.float32 and half.decode(z.half()).dtype == torch.float16
    with pytest.raises(ConfigError, match="latents_mean"):  # per-channel statistics are refused, not ignored
        LatentCodec(AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latents_mean=(0.1,) * 4,
                                  latents_std=(0.9,) * 4))


def test_latent_codec_name():
    """The latent-cache identity: equal for equal weights and scaling, different when either changes."""
    def seeded_vae(**config):
        torch.manual_seed(0)
        return vae(**config)

    codec = LatentCodec(seeded_vae())
    assert LatentCodec(seeded_vae()).name == codec.name != LatentCodec(seeded_vae(scaling_factor=0.5)).name
    other = seeded_vae()
    with torch.no_grad():
        other.decoder.conv_out.bias[0] += 1e-3
    assert LatentCodec(other).name != codec.name
    assert codec.device == torch.device("cpu") and codec.dtype == torch.float32


@pytest.mark.parametrize("beta_schedule,beta_start,beta_end",
                         [("scaled_linear", 0.00085, 0.012), ("linear", 1e-4, 0.02)])
def test_scheduler_schedule_matches_diffusers(tmp_path, beta_schedule, beta_start, beta_end):
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end, num_train_timesteps=500,
                        prediction_type="v_prediction")
    ref.save_config(str(tmp_path / "scheduler"))
    schedule, prediction = scheduler_schedule(tmp_path)
    assert prediction == "v" and schedule.num_steps == 500
    torch.testing.assert_close(schedule.alphas_cumprod, ref.alphas_cumprod.double(), rtol=0, atol=1e-6)
    t = torch.arange(500, dtype=torch.float64) / 499
    torch.testing.assert_close(schedule.alpha(t) ** 2, ref.alphas_cumprod.double(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("diffusers_name,ours", sorted(PREDICTIONS.items()))
def test_prediction_types(tmp_path, diffusers_name, ours):
    assert scheduler_schedule(write_scheduler(tmp_path, prediction_type=diffusers_name))[1] == ours


@pytest.mark.parametrize("config,words", [({"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule 'squaredcos_cap_v2'"),
                                          ({"trained_betas": [0.1] * 10}, "with trained_betas"),
                                          ({"prediction_type": "flow"}, "prediction_type 'flow'"),
                                          ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr")])
def test_scheduler_schedule_rejects(tmp_path, config, words):
    with pytest.raises(ConfigError, match=f"teacher.path .*scheduler_config.json .*{words}"):
        scheduler_schedule(write_scheduler(tmp_path, **config))
    with pytest.raises(ConfigError, match="scheduler_config.json cannot be read"):
        scheduler_schedule(tmp_path / "elsewhere")


def test_check_pipeline_folder(tmp_path, folders):
    with pytest.raises(ConfigError) as e:
        check_pipeline_folder(None, "sd15")
    assert "teacher.path is not set" in one_line(e) and "model_index.json, unet/" in one_line(e)
    with pytest.raises(ConfigError) as e:
        check_pipeline_folder(tmp_path / "nope", "sdxl")
    assert "does not exist" in one_line(e) and "text_encoder_2/" in one_line(e)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="teacher.path .* is not a folder"):
        check_pipeline_folder(tmp_path / "file", "sd15")
    prompts = write_prompts(tmp_path / "prompts" / "prompts.txt", PROMPTS)
    assert prompts.read_text().splitlines() == PROMPTS
    with pytest.raises(ConfigError) as e:
        check_pipeline_folder(prompts.parent, "sd15")
    assert "is not a diffusers pipeline folder (no model_index.json)" in one_line(e)
    with pytest.raises(ConfigError) as e:
        load_sd(folders["sd15"], "sdxl")
    assert "has no text_encoder_2/, tokenizer_2/" in one_line(e) and "use teacher=sd15" in one_line(e)
    with pytest.raises(ConfigError, match="'sd21' is not a Stable Diffusion kind"):
        check_pipeline_folder(folders["sd15"], "sd21")
    assert check_pipeline_folder(str(folders["sdxl"]), "sdxl") == folders["sdxl"]


def test_bad_folders(tmp_path, folders):
    with pytest.raises(ConfigError) as e:
        load_sd(make_tiny_sd15(tmp_path / "plain", cross_attention=False), "sd15")
    assert "teacher=sd15" in one_line(e) and "unet has no cross-attention" in one_line(e)
    with pytest.raises(ConfigError, match="teacher=sd15 but the folder's unet takes SDXL's .* use teacher=sdxl"):
        load_sd(folders["sdxl"], "sd15")
    broken = shutil.copytree(folders["sd15"], tmp_path / "broken")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError) as e:
        load_sd(broken, "sd15")
    assert one_line(e).startswith(f"teacher.path '{broken}': cannot load unet (")
    assert one_line(e).endswith("expected a diffusers sd15 pipeline folder")


def test_needs_prompts(folders):
    parts = load_sd(folders["sdxl"], "sdxl")
    with pytest.raises(ConfigError, match="needs prompt conditioning"):
        guided(parts.denoiser, 3.0).x0(noise(), 1.0, None)
    with pytest.raises(ConfigError, match="height and width"):
        parts.text.cond(PROMPTS)
    assert isinstance(parts.text.cond(PROMPTS, height=16, width=16), Cond)
