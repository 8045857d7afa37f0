"""The Sana adapter against diffusers' own computation, on tiny random pipeline folders (tests/sana_fixtures.py).

The strongest check runs SanaPipeline itself (on FlowMatchEulerDiscreteScheduler with the folder's shift) and records
every transformer call: each guided prediction it forms must equal ``Guided(denoiser, w)`` at the same latents and
sigma, and the latents it returns must equal onestep's Euler sampler on the same t-list, prompt encoding and
classifier-free guidance included.
"""

import json
import shutil

import pytest
import torch
from conftest import noise, one_line, rel_err, write_scheduler
from sana_fixtures import FLOW_SHIFT, make_tiny_sana, scheduler, transformer, vae

from onestep.conditioning import Cond
from onestep.denoisers.attention import set_attention
from onestep.denoisers.base import Guided, guided
from onestep.denoisers.sana import SanaTextEncoder, check_sana_folder, load_sana, sana_schedule
from onestep.denoisers.sd import LatentCodec
from onestep.errors import ConfigError
from onestep.sampling import sample

PROMPTS = ["a Red cat", "two blue dogs!"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sana")
    return {"sana": make_tiny_sana(root / "sana"), "learned": make_tiny_sana(root / "learned", out_channels=8)}


@pytest.fixture(scope="module")
def parts(folders):
    return {name: load_sana(folder) for name, folder in folders.items()}


def pipeline(folder):
    """The folder's own SanaPipeline, on the Euler scheduler (its sigma N is the transformer's timestep as it is)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline

    pipe = SanaPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=pipe.scheduler.config.flow_shift)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline(pipe, latents, sigmas, w, negative, **kwargs):
    """SanaPipeline.__call__ from ``latents``, recording each transformer call's (input, timestep, output)."""
    calls = []
    hook = pipe.transformer.register_forward_hook(
        lambda m, args, kw, out: calls.append((args[0], kw["timestep"], out[0])), with_kwargs=True)
    try:
        out = pipe(PROMPTS, negative_prompt=negative or "", sigmas=sigmas, guidance_scale=w, latents=latents.clone(),
                   height=32, width=32, use_resolution_binning=False, **kwargs).images
    finally:
        hook.remove()
    return out, calls


@pytest.mark.parametrize("name,w,negative,steps", [("sana", 1.0, None, 2), ("sana", 4.5, None, 1),
                                                   ("sana", 4.5, "blurry", 2), ("learned", 4.5, None, 2)])
def test_pipeline_equals_guided_flow_and_euler_sampler(folders, parts, name, w, negative, steps):
    pipe, p = pipeline(folders[name]), parts[name]
    schedule = p.denoiser.schedule
    assert schedule.shift == FLOW_SHIFT
    ts = schedule.default_ts(steps)
    # the scheduler shifts the sigmas it is given: give it the unshifted grid of ts
    grid = ts / (FLOW_SHIFT - (FLOW_SHIFT - 1) * ts)
    z = noise() * schedule.prior_std(ts[:1]).float()  # onestep's sampler starts from prior_std(t_0) * noise
    ref, calls = run_pipeline(pipe, z, grid.tolist(), w, negative, output_type="latent")
    torch.testing.assert_close(pipe.scheduler.sigmas[:-1].double(), ts, rtol=0, atol=1e-6)
    cond = p.text.cond(PROMPTS, negative, height=p.image_size, width=p.image_size)
    model = Guided(p.denoiser, w)
    assert len(calls) == steps
    for (x, timestep, out), sigma in zip(calls, pipe.scheduler.sigmas):
        x = x[-2:]  # the conditional half: the pipeline stacks [unconditional, conditional] for CFG
        assert torch.equal(timestep, sigma * 1000 * torch.ones(len(out)))  # timestep = sigma N, timestep_scale 1
        # the pipeline's own combination of the recorded output: CFG, then the learned-variance cut
        pred = out.float()
        if w > 1:
            u, c = pred.chunk(2)
            pred = u + w * (c - u)
        if p.denoiser.learned_variance:
            pred = pred.chunk(2, dim=1)[0]
        assert rel_err(model.flow(x, sigma, cond), pred) < 1e-5
    assert rel_err(sample(p.denoiser, noise(), ts, cond, method="euler", guidance=w), ref) < 1e-5


def test_learned_variance(parts):
    p = parts["learned"]
    assert p.denoiser.learned_variance and not parts["sana"].denoiser.learned_variance
    assert p.denoiser.transformer.config.out_channels == 8 and p.denoiser.data_shape == (4, 8, 8)
    cond = p.text.cond(PROMPTS)
    assert p.denoiser(noise(), 0.5, cond).shape == (2, 4, 8, 8)


def test_text_fields(folders, parts):
    """The fields are SanaPipeline.__call__'s: the complex human instruction on prompts, none on the null row."""
    from diffusers import SanaPipeline

    text = parts["sana"].text
    cond = text.cond(PROMPTS, "blurry")
    assert set(cond.fields) == {"prompt_embeds", "prompt_attention_mask"} and cond.texts == PROMPTS
    assert cond["prompt_embeds"].shape == (2, 300, 32) and cond["prompt_attention_mask"].dtype == torch.int64
    # <bos> + the last 299 of (instruction + prompt) tokens, one character each: the instruction's final space, the
    # prompt, then padding
    assert cond["prompt_attention_mask"].sum(1).tolist() == [1 + 1 + len(p) for p in PROMPTS]
    pipe = SanaPipeline.from_pretrained(str(folders["sana"]), local_files_only=True)
    plain, _, neg, neg_mask = pipe.encode_prompt(PROMPTS, True, negative_prompt="blurry", device="cpu")
    assert not torch.allclose(cond["prompt_embeds"], plain)  # encode_prompt's own default has no instruction
    null = cond.null()
    # encoded as one row, where the pipeline encodes a batch: equal up to matmul rounding
    torch.testing.assert_close(null["prompt_embeds"], neg, rtol=1e-6, atol=1e-6)
    assert torch.equal(null["prompt_attention_mask"], neg_mask) and neg_mask.sum(1).tolist() == [1 + 6] * 2
    assert text.null_fields()["prompt_attention_mask"].sum() == 1  # "" is <bos> alone
    # the cache identity is the bytes: a copy has the same name, one changed weight byte another
    copy = shutil.copytree(folders["sana"], folders["sana"].parent / "copy")
    assert SanaTextEncoder(copy).name == text.name
    weights = copy / "text_encoder" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert SanaTextEncoder(copy).name != text.name


def test_features(parts):
    p = parts["sana"]
    d, x = p.denoiser, noise()
    f = d.features(x, 0.5, p.text.cond(PROMPTS))
    assert f.shape == (2, d.feature_dim) == (2, 16) and torch.isfinite(f).all()
    assert not torch.allclose(f, d.features(x, 0.5, p.text.cond(["green", "grass"])))
    out = d(x.double(), 0.5, p.text.cond(PROMPTS))  # the float32 transformer's output comes back in the input's dtype
    assert out.dtype == torch.float64 and torch.allclose(out.float(), d(x, 0.5, p.text.cond(PROMPTS)))


def test_codec_matches_pipeline_decode(folders, parts):
    p = parts["sana"]
    codec = p.codec
    assert (codec.latent_channels, codec.downsample, codec.scaling, codec.shift, codec.posterior) == \
        (4, 4, 0.41407, 0.0, False)
    assert p.image_size == 32
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    z = codec.encode(images)
    assert z.shape == (2, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(z, codec.vae.encode(images).latent * 0.41407)
    back = codec.decode(z)
    assert back.shape == (2, 3, 32, 32) and back.min() >= -1 and back.max() <= 1
    # the pipeline's decode of the latents it makes, against ours of the same latents
    pipe, grid = pipeline(folders["sana"]), [0.9]
    latents, _ = run_pipeline(pipe, noise(), grid, 1.0, None, output_type="latent")
    pixels, _ = run_pipeline(pipe, noise(), grid, 1.0, None, output_type="pt")
    torch.testing.assert_close((codec.decode(latents) + 1) / 2, pixels, rtol=1e-6, atol=1e-6)
    # the identity of latent caches follows the scaling
    torch.manual_seed(0)
    assert LatentCodec(vae(scaling_factor=0.5).eval()).name != LatentCodec(vae().eval()).name


@pytest.mark.parametrize("option", ["math", "jvp_flash"])
def test_attention_kernels_refuse_linear_attention(folders, option):
    """onestep.kernels compute softmax attention: they must not replace Sana's linear self-attention."""
    d = load_sana(folders["sana"]).denoiser
    with pytest.raises(ConfigError) as e:
        set_attention(d, option)
    assert f"generator.attention={option} would replace the linear attention of transformer.transformer_blocks.0" \
        in one_line(e) and "use generator.attention=default" in one_line(e)
    assert type(d.transformer.transformer_blocks[0].attn1.processor).__name__ == "SanaLinearAttnProcessor2_0"
    assert set_attention(d, "default") is d


@pytest.mark.parametrize("kind", ["dpm", "euler"])
def test_schedule_reproduces_scheduler_sigmas(tmp_path, kind):
    ref = scheduler(kind)
    ref.save_config(str(tmp_path / "scheduler"))
    schedule, steps = sana_schedule(tmp_path)
    assert (schedule.shift, steps) == (FLOW_SHIFT, 1000)
    if kind == "dpm":  # DPM-Solver's flow sigmas: the shift map of 1 - linspace(1, 1/N, n + 1), last dropped
        ref.set_timesteps(4)
        u = 1 - torch.linspace(1, 1 / 1000, 5, dtype=torch.float64)
        expected = schedule.shifted(u).flip(0)[:-1]
    else:
        u = torch.tensor([0.9, 0.6, 0.3, 0.1], dtype=torch.float64)
        ref.set_timesteps(sigmas=u.tolist())
        expected = schedule.shifted(u)
    torch.testing.assert_close(ref.sigmas[:-1].double(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("config,words", [
    ({"_class_name": "SCMScheduler"}, "names SCMScheduler; teacher=sana reads"),
    ({"_class_name": "DPMSolverMultistepScheduler", "prediction_type": "epsilon"}, "without use_flow_sigmas"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True}, "passes no mu"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "invert_sigmas": True}, "invert_sigmas"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 0}, "shift=0; it must be > 0")])
def test_schedule_rejects(tmp_path, config, words):
    with pytest.raises(ConfigError, match=f"teacher.path .*scheduler_config.json .*{words}"):
        sana_schedule(write_scheduler(tmp_path, **config))
    with pytest.raises(ConfigError, match="scheduler_config.json cannot be read"):
        sana_schedule(tmp_path / "elsewhere")


def test_bad_folders(tmp_path, folders):
    with pytest.raises(ConfigError) as e:
        load_sana(None)
    assert "teacher.path is not set" in one_line(e) and "model_index.json, transformer/, vae/" in one_line(e)
    with pytest.raises(ConfigError) as e:
        load_sana(tmp_path / "nope")
    assert "does not exist" in one_line(e) and "text_encoder/, tokenizer/, scheduler/" in one_line(e)
    (tmp_path / "plain").mkdir()
    with pytest.raises(ConfigError, match="is not a diffusers pipeline folder .no model_index.json."):
        check_sana_folder(tmp_path / "plain")
    # an SD3 folder has every sub-folder Sana needs: its model_index.json names it
    sd3 = shutil.copytree(folders["sana"], tmp_path / "sd3")
    index = json.loads((sd3 / "model_index.json").read_text())
    (sd3 / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(ConfigError) as e:
        load_sana(sd3)
    assert "holds a StableDiffusion3Pipeline (model_index.json), not a sana pipeline; use teacher=sd3" in one_line(e)
    broken = shutil.copytree(folders["sana"], tmp_path / "broken")
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError) as e:
        load_sana(broken)
    assert one_line(e).startswith(f"teacher.path '{broken}': cannot load transformer (")
    assert one_line(e).endswith("expected a diffusers sana pipeline folder")
    with pytest.raises(ConfigError) as e:
        load_sana(folders["sana"], resolution=30)
    assert "teacher.resolution=30 must be a positive multiple of 4" in one_line(e)
    assert load_sana(folders["sana"], resolution=64).denoiser.data_shape == (4, 16, 16)


def test_refuses_sprint_and_mismatched_parts(tmp_path, folders):
    for name, model in {"sprint": transformer(guidance_embeds=True), "wide": transformer(8, in_channels=8)}.items():
        shutil.rmtree(shutil.copytree(folders["sana"], tmp_path / name) / "transformer")
        model.save_pretrained(str(tmp_path / name / "transformer"))
    with pytest.raises(ConfigError) as e:
        load_sana(tmp_path / "sprint")
    assert "embeds a guidance scale (SANA-Sprint), which SanaPipeline cannot run" in one_line(e)
    with pytest.raises(ConfigError, match="transformer takes 8 input channels but the vae makes 4-channel"):
        load_sana(tmp_path / "wide")


def test_needs_prompts(parts):
    p = parts["sana"]
    with pytest.raises(ConfigError, match="needs prompt conditioning"):
        guided(p.denoiser, 4.5).x0(noise(), 1.0, None)
    embeds_only = Cond({"prompt_embeds": torch.zeros(2, 300, 32)}, {"prompt_embeds": torch.zeros(1, 300, 32)})
    with pytest.raises(ConfigError, match="needs prompt conditioning"):
        p.denoiser(noise(), 0.5, embeds_only)
