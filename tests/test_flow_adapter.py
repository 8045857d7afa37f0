"""The SD3 / Flux adapters against diffusers' own computation, on tiny random pipeline folders.

Reference calls are made the way the pipelines' ``__call__`` makes them (prompt encoding, Flux's packing and position
ids, timestep scaling, embedded guidance, CFG); the strongest check runs the pipeline itself for two Euler steps on
given sigmas and compares with onestep's sampler on the wrapped teacher.
"""

import json
import math
import shutil

import pytest
import torch
from conftest import noise
from flow_fixtures import FLUX_SHIFT, SD3_SHIFT, T5_TOKENS, make_tiny_flux, make_tiny_sd3
from sd_fixtures import make_tiny_sd15

from onestep.conditioning import Cond
from onestep.denoisers.base import GUIDANCE, Guided, guided
from onestep.denoisers.flow import (FlowTextEncoder, FlowTransformerDenoiser, check_flow_folder, flow_schedule,
                                    image_ids, load_flow, pack, unpack)
from onestep.errors import ConfigError
from onestep.networks import View
from onestep.sampling import sample

PROMPTS = ["a red cat", "two blue dogs!"]
#: unshifted sigmas of a 2-step run; the pipelines' schedulers shift them, onestep's schedule.shifted must agree
UNIT_SIGMAS = [0.9, 0.45]
KIND = {"sd3": "sd3", "flux": "flux", "flux_plain": "flux"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    return {"sd3": make_tiny_sd3(root / "sd3"), "flux": make_tiny_flux(root / "flux"),
            "flux_plain": make_tiny_flux(root / "flux_plain", guidance_embeds=False)}


@pytest.fixture(scope="module")
def loaded(folders):
    return {name: load_flow(folder, KIND[name], resolution=16, max_sequence_length=T5_TOKENS)
            for name, folder in folders.items()}


def pipeline(folder, kind):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline

    pipe = (StableDiffusion3Pipeline if kind == "sd3" else FluxPipeline).from_pretrained(str(folder),
                                                                                      local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


# --- (a) the wrapped transformer equals the pipeline's call ------------------------------------------------------

@torch.no_grad()  # as the pipelines' __call__ (T5 under autograd rounds differently)
def sd3_reference(pipe, x, sigma, negative=None, w=1.0):
    """StableDiffusion3Pipeline's denoising-loop call at sigma: timestep = sigma * 1000, CFG on cat([neg, pos])."""
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, None, None, device="cpu",
                                                         do_classifier_free_guidance=w > 1, negative_prompt=negative,
                                                         max_sequence_length=T5_TOKENS)
    timestep = torch.tensor(sigma * pipe.scheduler.config.num_train_timesteps, dtype=torch.float32)
    if w > 1:
        embeds, pooled, x = torch.cat([neg, embeds]), torch.cat([neg_pooled, pooled]), torch.cat([x, x])
    out = pipe.transformer(hidden_states=x, timestep=timestep.expand(x.shape[0]), encoder_hidden_states=embeds,
                           pooled_projections=pooled, return_dict=False)[0]
    if w > 1:
        u, c = out.chunk(2)
        out = u + w * (c - u)
    return out


@torch.no_grad()
def flux_reference(pipe, x, sigma, w=3.5):
    """FluxPipeline's denoising-loop call at sigma: packed latents, ids, timestep = sigma * 1000 / 1000, guidance."""
    b, c, h, wd = x.shape
    embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, None, device="cpu", max_sequence_length=T5_TOKENS)
    ids = pipe._prepare_latent_image_ids(b, h // 2, wd // 2, "cpu", embeds.dtype)
    t = torch.tensor(sigma * pipe.scheduler.config.num_train_timesteps, dtype=torch.float32)
    guidance = torch.full([1], w, dtype=torch.float32).expand(b) if pipe.transformer.config.guidance_embeds else None
    out = pipe.transformer(hidden_states=pipe._pack_latents(x, b, c, h, wd), timestep=t.expand(b) / 1000,
                           guidance=guidance, pooled_projections=pooled, encoder_hidden_states=embeds,
                           txt_ids=text_ids, img_ids=ids, return_dict=False)[0]
    return pipe._unpack_latents(out, h * pipe.vae_scale_factor, wd * pipe.vae_scale_factor, pipe.vae_scale_factor)


@pytest.mark.parametrize("sigma", [0.8, 0.3])
def test_sd3_transformer_call(folders, loaded, sigma):
    pipe, parts = pipeline(folders["sd3"], "sd3"), loaded["sd3"]
    x = noise(seed=2)
    cond = parts.text.cond(PROMPTS, "blurry")
    close(parts.denoiser(x, sigma, cond), sd3_reference(pipe, x, sigma))
    close(parts.denoiser.flow(x, sigma, cond), sd3_reference(pipe, x, sigma))
    # (c) SD3 has no guidance embedding: guided() is two-branch CFG on the encoded negative prompt
    assert not parts.denoiser.embedded_guidance and parts.denoiser.guidance is None
    close(guided(parts.denoiser, 4.0).flow(x, sigma, cond),
          sd3_reference(pipe, x, sigma, negative=["blurry"] * 2, w=4.0))


@pytest.mark.parametrize("sigma", [0.8, 0.3])
@pytest.mark.parametrize("name", ["flux", "flux_plain"])
def test_flux_transformer_call(folders, loaded, name, sigma):
    pipe, parts = pipeline(folders[name], "flux"), loaded[name]
    x, d = noise(seed=2), parts.denoiser
    cond = parts.text.cond(PROMPTS)
    assert d.data_shape == (4, 8, 8) and d.prediction == "flow"
    # the bare teacher: guidance-distilled Flux gets its default embedded scale (FluxPipeline's 3.5)
    close(d(x, sigma, cond), flux_reference(pipe, x, sigma, 3.5))


def test_flux_embedded_guidance(folders, loaded):
    """(c) guided(flux, w) runs the transformer once with guidance = w, through any wrapper (the Networks' View)."""
    pipe, d = pipeline(folders["flux"], "flux"), loaded["flux"].denoiser
    x, cond, sigma = noise(seed=3), loaded["flux"].text.cond(PROMPTS), 0.6
    assert d.embedded_guidance and d.guidance == 3.5
    ref = flux_reference(pipe, x, sigma, w=5.0)
    for view in (d, View(d)):
        g = guided(view, 5.0)
        assert isinstance(g, Guided) and g.base is view
        close(g.flow(x, sigma, cond), ref)
    # guided(d, 1) is d itself, at its own default scale; an explicit Guided(d, 1) feeds guidance 1
    assert guided(d, 1.0) is d
    close(Guided(d, 1.0).flow(x, sigma, cond), flux_reference(pipe, x, sigma, w=1.0))
    assert (ref - flux_reference(pipe, x, sigma, w=1.0)).abs().max() > 1e-4  # the scale reaches the network
    # the field rides on the conditioning: rows and the null row, the prompts untouched
    g = Guided(d, 5.0)
    calls = []
    hook = d.register_forward_pre_hook(lambda m, args: calls.append(args[2]))
    g.flow(x, sigma, cond)
    hook.remove()
    seen = calls[0]
    assert len(calls) == 1 and seen.texts == PROMPTS and GUIDANCE not in cond
    assert seen[GUIDANCE].tolist() == [5.0, 5.0] and seen.null()[GUIDANCE].tolist() == [5.0, 5.0]
    # a denoiser built with another default scale (teacher.guidance) uses it when no view sets one
    other = FlowTransformerDenoiser(d.transformer, d.schedule, "flux", 8, guidance=5.0)
    close(other(x, sigma, cond), ref)


def test_flux_plain_guided_is_cfg(folders, loaded):
    """(c) Flux without a guidance embedding: guided() is CFG, as FluxPipeline's true CFG with negative_prompt."""
    d, text = loaded["flux_plain"].denoiser, loaded["flux_plain"].text
    assert not d.embedded_guidance and guided(d, 1.0) is d
    x, cond, sigma = noise(seed=4), text.cond(PROMPTS), 0.5
    c, u = d(x, sigma, cond), d(x, sigma, cond.null())
    close(guided(d, 2.5).flow(x, sigma, cond), u + 2.5 * (c - u))


def test_pack_and_ids_match_pipeline():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 8, 6)
    tokens = pack(x)
    assert torch.equal(tokens, FluxPipeline._pack_latents(x, 2, 4, 8, 6))
    assert torch.equal(unpack(tokens, 8, 6), x)
    assert torch.equal(unpack(tokens, 8, 6), FluxPipeline._unpack_latents(tokens, 16, 12, 2))
    assert torch.equal(image_ids(8, 6), FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32))


# --- end to end: the pipeline's Euler steps equal onestep's sampler -----------------------------------------------

def run_pipeline(pipe, kind, z, **kwargs):
    """The pipeline on UNIT_SIGMAS (its scheduler shifts them) from latents z, latents out ((C, H, W) for Flux)."""
    if kind == "flux":
        z = pipe._pack_latents(z, *z.shape)
    out = pipe(PROMPTS, sigmas=UNIT_SIGMAS, num_inference_steps=len(UNIT_SIGMAS), latents=z, height=16, width=16,
               output_type="latent", max_sequence_length=T5_TOKENS, **kwargs).images
    return pipe._unpack_latents(out, 16, 16, pipe.vae_scale_factor) if kind == "flux" else out


@pytest.mark.parametrize("name,w,negative", [("sd3", 1.0, None), ("sd3", 4.0, None), ("sd3", 4.0, "blurry"),
                                             ("flux", 3.5, None), ("flux", 6.0, None), ("flux_plain", 1.0, None),
                                             ("flux_plain", 3.0, "blurry")])
def test_pipeline_euler_equals_sample(folders, loaded, name, w, negative):
    kind = KIND[name]
    pipe, parts = pipeline(folders[name], kind), loaded[name]
    ts = parts.denoiser.schedule.shifted(torch.tensor(UNIT_SIGMAS, dtype=torch.float64))
    z = noise(seed=5)
    if kind == "sd3":
        kwargs = {"guidance_scale": w, "negative_prompt": negative}
    elif name == "flux":
        kwargs = {"guidance_scale": w}
    else:  # true CFG needs a negative prompt; "" is onestep's null row without one
        kwargs = {"true_cfg_scale": w, "negative_prompt": negative or ""}
    # the pipelines start from the given latents at sigma_0; onestep's sampler from sigma_0 * noise
    ref = run_pipeline(pipe, kind, z * ts.float()[0], **kwargs)
    torch.testing.assert_close(pipe.scheduler.sigmas[:-1], ts.float(), rtol=1e-6, atol=1e-6)
    ours = sample(parts.denoiser, z, ts, parts.text.cond(PROMPTS, negative), method="euler", guidance=w)
    close(ours, ref)


# --- (b) the shift equals the scheduler's ------------------------------------------------------------------------

def test_sd3_shift_matches_scheduler(folders, loaded):
    from diffusers import FlowMatchEulerDiscreteScheduler

    schedule = loaded["sd3"].denoiser.schedule
    assert schedule.shift == SD3_SHIFT and loaded["sd3"].denoiser.num_train_timesteps == 1000
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(str(folders["sd3"]), subfolder="scheduler")
    u = torch.linspace(0.95, 0.05, 7, dtype=torch.float64)
    sched.set_timesteps(sigmas=u.tolist())
    close(schedule.shifted(u).float(), sched.sigmas[:-1], 1e-6)
    # default_ts is the scheduler's shift of onestep's own uniform grid (diffusers' default grid is linspace(1, 1/N)
    # shifted, with sigma_min shifted twice, so the grids themselves differ; the map is what must agree)
    grid = torch.linspace(schedule.t_max, schedule.t_min_sample, 5, dtype=torch.float64)[:-1]
    sched.set_timesteps(sigmas=grid.tolist())
    close(schedule.default_ts(4).float(), sched.sigmas[:-1].clamp(max=schedule.t_max), 1e-6)


@pytest.mark.parametrize("resolution,tokens", [(16, 16), (32, 64)])
def test_flux_dynamic_shift_matches_scheduler(folders, resolution, tokens):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(str(folders["flux"]), subfolder="scheduler")
    c = sched.config
    mu = calculate_shift(tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    u = torch.linspace(0.95, 0.05, 7, dtype=torch.float64)
    sched.set_timesteps(sigmas=u.tolist(), mu=mu)
    schedule, steps = flow_schedule(folders["flux"], tokens)
    assert steps == 1000 and schedule.shift == pytest.approx(math.exp(mu), rel=1e-12)
    close(schedule.shifted(u).float(), sched.sigmas[:-1], 1e-6)
    d = load_flow(folders["flux"], "flux", resolution=resolution, max_sequence_length=T5_TOKENS).denoiser
    assert d.schedule.shift == schedule.shift and d.data_shape == (4, resolution // 2, resolution // 2)


def test_flow_schedule_options(tmp_path):
    def write(**config):
        (tmp_path / "scheduler").mkdir(exist_ok=True)
        (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
        return tmp_path

    assert flow_schedule(write(), 16)[0].shift == 1.0
    assert flow_schedule(write(shift=2.5, num_train_timesteps=500), 16)[0].shift == 2.5
    assert flow_schedule(write(shift=2.5, num_train_timesteps=500), 16)[1] == 500
    linear = flow_schedule(write(**FLUX_SHIFT, time_shift_type="linear"), 16)[0].shift
    assert linear == pytest.approx(math.log(flow_schedule(write(**FLUX_SHIFT), 16)[0].shift), rel=1e-12)
    with pytest.raises(ConfigError, match="invert_sigmas"):
        flow_schedule(write(invert_sigmas=True), 16)
    with pytest.raises(ConfigError, match="scheduler_config.json cannot be read"):
        flow_schedule(tmp_path / "elsewhere", 16)


# --- conditioning, features ----------------------------------------------------------------------------------------

def test_sd3_fields_match_pipeline(folders, loaded):
    pipe, text = pipeline(folders["sd3"], "sd3"), loaded["sd3"].text
    with torch.no_grad():  # as the pipelines' __call__ (T5 under autograd rounds differently)
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, None, None, device="cpu",
                                                             max_sequence_length=T5_TOKENS)
    cond = text.cond(PROMPTS)
    assert cond["prompt_embeds"].shape == (2, 16 + T5_TOKENS, pipe.text_encoder_3.config.d_model)
    assert torch.equal(cond["prompt_embeds"], embeds) and torch.equal(cond["pooled_prompt_embeds"], pooled)
    null = cond.null()
    # the null row is the encoded "" (one row, where the pipeline encodes a batch: equal up to matmul rounding)
    close(null["prompt_embeds"], neg, 1e-6)
    close(null["pooled_prompt_embeds"], neg_pooled, 1e-6)
    assert cond.texts == PROMPTS and cond.null_text == ""


def test_flux_fields_and_name(folders, loaded, tmp_path):
    pipe, text = pipeline(folders["flux"], "flux"), loaded["flux"].text
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(PROMPTS, None, device="cpu", max_sequence_length=T5_TOKENS)
        neg, neg_pooled, _ = pipe.encode_prompt(["ugly"], None, device="cpu", max_sequence_length=T5_TOKENS)
    cond = text.cond(PROMPTS, "ugly")
    assert set(cond.fields) == {"prompt_embeds", "pooled_prompt_embeds"}
    assert torch.equal(cond["prompt_embeds"], embeds) and torch.equal(cond["pooled_prompt_embeds"], pooled)
    assert torch.equal(cond.null()["prompt_embeds"][:1], neg) and cond.null_text == "ugly"
    assert torch.equal(cond.null()["pooled_prompt_embeds"][:1], neg_pooled)
    # the default T5 length is the pipeline's call default
    assert FlowTextEncoder(folders["flux"], "flux").max_sequence_length == 512
    # the cache identity: the bytes and the T5 length
    copy = shutil.copytree(folders["flux"], tmp_path / "copy")
    assert FlowTextEncoder(copy, "flux", max_sequence_length=T5_TOKENS).name == text.name
    assert FlowTextEncoder(copy, "flux", max_sequence_length=8).name != text.name
    weights = copy / "text_encoder_2" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert FlowTextEncoder(copy, "flux", max_sequence_length=T5_TOKENS).name != text.name
    with pytest.raises(ConfigError, match="max_sequence_length=600"):
        FlowTextEncoder(folders["flux"], "flux", max_sequence_length=600)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_features(loaded, name):
    parts = loaded[name]
    d, x = parts.denoiser, noise()
    f = d.features(x, 0.5, parts.text.cond(PROMPTS))
    assert f.shape == (2, d.feature_dim) == (2, 16) and torch.isfinite(f).all()
    # the image tokens after the last block are what the output norm reads
    seen = []
    hook = d.transformer.norm_out.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    d(x, 0.5, parts.text.cond(PROMPTS))
    hook.remove()
    close(f, seen[0].mean(1), 1e-6)
    assert not torch.allclose(f, d.features(x, 0.5, parts.text.cond(["green", "grass"])))
    out = d(x.double(), 0.5, parts.text.cond(PROMPTS))
    assert out.dtype == torch.float64 and torch.allclose(out.float(), d(x, 0.5, parts.text.cond(PROMPTS)))


def test_codec_and_default_size(folders, loaded):
    assert (loaded["sd3"].codec.scaling, loaded["sd3"].codec.shift) == (1.5305, 0.0609)
    assert (loaded["flux"].codec.scaling, loaded["flux"].codec.shift) == (0.3611, 0.1159)
    # without teacher.resolution: SD3's transformer sample_size, Flux's pipeline default of 128 latents
    assert load_flow(folders["sd3"], "sd3", max_sequence_length=T5_TOKENS).image_size == 8 * 2
    flux = load_flow(folders["flux"], "flux", max_sequence_length=T5_TOKENS)
    assert flux.image_size == 128 * 2 and flux.denoiser.data_shape == (4, 128, 128)


# --- (d) errors ----------------------------------------------------------------------------------------------------

def one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_folder_errors(tmp_path, folders):
    with pytest.raises(ConfigError) as e:
        load_flow(None, "flux")
    assert "teacher.path is not set" in one_line(e) and "transformer/" in one_line(e)
    with pytest.raises(ConfigError) as e:
        load_flow(tmp_path / "nope", "sd3")
    assert "does not exist" in one_line(e) and "text_encoder_3/, tokenizer_3/" in one_line(e)
    with pytest.raises(ConfigError) as e:
        load_flow(folders["flux"], "sd3")
    assert "has no text_encoder_3/, tokenizer_3/ needed by teacher=sd3 (a Flux folder? use teacher=flux)" in one_line(e)
    with pytest.raises(ConfigError) as e:  # an SD3 folder has every sub-folder Flux needs: its model_index names it
        load_flow(folders["sd3"], "flux")
    assert "holds a StableDiffusion3Pipeline (model_index.json), not a flux pipeline; use teacher=sd3" in one_line(e)
    sd15 = make_tiny_sd15(tmp_path / "sd15")
    with pytest.raises(ConfigError) as e:
        load_flow(sd15, "flux")
    assert "has no transformer/" in one_line(e) and "use teacher=sd15" in one_line(e)
    with pytest.raises(ConfigError) as e:
        load_flow(folders["flux"], "sdxl")
    assert "'sdxl' is not a flow-transformer kind; use teacher=sd3 or teacher=flux" in one_line(e)
    assert check_flow_folder(str(folders["sd3"]), "sd3") == folders["sd3"]
    with pytest.raises(ConfigError) as e:
        load_flow(folders["flux"], "flux", resolution=18)
    assert "teacher.resolution=18 must be a positive multiple of 4" in one_line(e)
    with pytest.raises(ConfigError, match="larger than the SD3 transformer's position table"):
        load_flow(folders["sd3"], "sd3", resolution=128)
    broken = shutil.copytree(folders["flux"], tmp_path / "broken")
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError) as e:
        load_flow(broken, "flux")
    assert one_line(e).startswith(f"teacher.path '{broken}': cannot load transformer (")


def test_needs_prompts(loaded):
    d = loaded["flux"].denoiser
    with pytest.raises(ConfigError, match="needs prompt conditioning"):
        guided(d, 3.0).flow(noise(), 0.5, None)
    assert isinstance(loaded["sd3"].text.cond(PROMPTS), Cond)
