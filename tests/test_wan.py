"""The Wan 2.1 / 2.2 adapter against diffusers' own computation, on tiny random WanPipeline folders.

Reference calls are made the way WanPipeline's ``__call__`` makes them (encode_prompt, timestep = the scheduler's
sigma N, the expert switch at boundary_ratio N, CFG u + w (c - u)); the strongest check runs the pipeline itself for
two Euler steps and compares with onestep's sampler on the wrapped teacher, decoded video included.
"""

import json
import shutil

import pytest
import torch
from video_fixtures import (BOUNDARY_RATIO, LATENT_SHAPE, NUM_FRAMES, RESOLUTION, SHIFT, T5_TOKENS,
                            make_tiny_wan)

from onestep.denoisers.base import guided
from onestep.denoisers.wan import WanDenoiser, load_wan, wan_schedule
from onestep.errors import ConfigError
from onestep.sampling import sample

PROMPTS = ["a red cat", "two blue dogs!"]
#: unshifted sigmas of a 2-step run; the scheduler shifts them, onestep's schedule.shifted must agree
UNIT_SIGMAS = [0.9, 0.45]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    return {"wan21": make_tiny_wan(root / "wan21"), "wan22": make_tiny_wan(root / "wan22", two_experts=True),
            "wan21_euler": make_tiny_wan(root / "wan21_euler", scheduler="euler"),
            "wan22_euler": make_tiny_wan(root / "wan22_euler", two_experts=True, scheduler="euler")}


def load(folder, **kwargs):
    return load_wan(folder, resolution=RESOLUTION, num_frames=NUM_FRAMES, max_sequence_length=T5_TOKENS, **kwargs)


@pytest.fixture(scope="module")
def loaded(folders):
    return {name: load(folder) for name, folder in folders.items()}


def pipeline(folder):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def latents(n=2, seed=1):
    return torch.randn(n, *LATENT_SHAPE, generator=torch.Generator().manual_seed(seed))


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@torch.no_grad()  # as WanPipeline.__call__
def reference(pipe, x, sigma, negative=None, w=1.0):
    """WanPipeline's denoising-loop call at sigma (one value per row): timestep = sigma N, the expert by
    ``t >= boundary_ratio N``, CFG on the encoded negative prompt."""
    embeds, neg = pipe.encode_prompt(PROMPTS, negative, do_classifier_free_guidance=w > 1, device="cpu",
                                     max_sequence_length=T5_TOKENS)
    n = pipe.scheduler.config.num_train_timesteps
    out = []
    for i, s in enumerate(sigma):
        t = torch.tensor(s * n, dtype=torch.float32)
        boundary = None if pipe.config.boundary_ratio is None else pipe.config.boundary_ratio * n
        model = pipe.transformer if boundary is None or t >= boundary else pipe.transformer_2
        call = dict(hidden_states=x[i:i + 1], timestep=t.expand(1), return_dict=False)
        pred = model(encoder_hidden_states=embeds[i:i + 1], **call)[0]
        if w > 1:
            uncond = model(encoder_hidden_states=neg[i:i + 1], **call)[0]
            pred = uncond + w * (pred - uncond)
        out.append(pred)
    return torch.cat(out)


# --- the wrapped transformer equals the pipeline's call ---------------------------------------------------------

@pytest.mark.parametrize("name", ["wan21", "wan22"])
@pytest.mark.parametrize("w,negative", [(1.0, None), (5.0, None), (5.0, "blurry, static")])
def test_transformer_call(folders, loaded, name, w, negative):
    pipe, parts = pipeline(folders[name]), loaded[name]
    x, sigma = latents(), [0.95, 0.4]  # one row on each side of Wan 2.2's boundary (0.875)
    cond = parts.text.cond(PROMPTS, negative)
    ours = guided(parts.denoiser, w)(x, torch.tensor(sigma), cond)
    close(ours, reference(pipe, x, sigma, negative, w))


@pytest.mark.parametrize("sigma", [[BOUNDARY_RATIO, BOUNDARY_RATIO - 1e-3], [BOUNDARY_RATIO + 1e-3, 0.2]])
def test_experts_switch_where_the_pipeline_switches(folders, loaded, sigma):
    """A row at timestep boundary_ratio N goes to the high-noise expert, one just below to the low-noise one; the
    two experts differ, so a wrong switch shows."""
    pipe, d = pipeline(folders["wan22"]), loaded["wan22"].denoiser
    x, cond = latents(), loaded["wan22"].text.cond(PROMPTS)
    ours = d(x, torch.tensor(sigma), cond)
    close(ours, reference(pipe, x, sigma))
    swapped = WanDenoiser(d.transformer_2, d.schedule, d.data_shape, transformer_2=d.transformer,
                          boundary_ratio=BOUNDARY_RATIO)
    assert (swapped(x, torch.tensor(sigma), cond) - ours).abs().amax((1, 2, 3, 4)).min() > 1e-3


# --- end to end: the pipeline's Euler steps (and its decoded video) equal onestep's sampler ----------------------

@pytest.mark.parametrize("name", ["wan21_euler", "wan22_euler"])
@pytest.mark.parametrize("w,negative", [(1.0, None), (4.0, "blurry")])
def test_pipeline_euler_equals_sample(folders, loaded, name, w, negative):
    pipe, parts = pipeline(folders[name]), loaded[name]
    # WanPipeline's call takes no sigmas: its scheduler gets UNIT_SIGMAS (and shifts them) when the call sets its steps
    set_timesteps = pipe.scheduler.set_timesteps
    pipe.scheduler.set_timesteps = lambda n, device=None: set_timesteps(sigmas=UNIT_SIGMAS, device=device)
    ts = parts.denoiser.schedule.shifted(torch.tensor(UNIT_SIGMAS, dtype=torch.float64))
    z = latents(seed=5)
    # the pipeline starts from the given latents at sigma_0; onestep's sampler from sigma_0 * noise
    out = pipe(PROMPTS, negative_prompt=negative, num_inference_steps=len(UNIT_SIGMAS), latents=z * ts.float()[0],
               height=RESOLUTION, width=RESOLUTION, num_frames=NUM_FRAMES, guidance_scale=w, output_type="pt",
               max_sequence_length=T5_TOKENS).frames  # (B, F, C, H, W) in [0, 1]
    torch.testing.assert_close(pipe.scheduler.sigmas[:-1], ts.float(), rtol=1e-6, atol=1e-6)
    # with two experts, the two steps fall on either side of the boundary
    assert ts[0] >= BOUNDARY_RATIO > ts[1]
    x = sample(parts.denoiser, z, ts, parts.text.cond(PROMPTS, negative), method="euler", guidance=w)
    video = (parts.codec.decode(x) / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)
    close(video, out)


def test_noise_and_shapes_match_the_pipeline(folders, loaded):
    """The pipeline's prepare_latents draws what torch.randn((n, *data_shape)) draws; the codec makes videos of
    num_frames frames of resolution x resolution and encodes them back to latents of data_shape."""
    pipe, parts = pipeline(folders["wan21"]), loaded["wan21"]
    assert parts.denoiser.data_shape == LATENT_SHAPE and parts.image_size == RESOLUTION
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    drawn = pipe.prepare_latents(2, LATENT_SHAPE[0], RESOLUTION, RESOLUTION, NUM_FRAMES, torch.float32, "cpu", g1)
    assert torch.equal(drawn, torch.randn((2, *parts.denoiser.data_shape), generator=g2))
    video = parts.codec.decode(latents())
    assert video.shape == (2, 3, NUM_FRAMES, RESOLUTION, RESOLUTION) and video.abs().max() <= 1
    assert parts.codec.encode(video).shape == (2, *LATENT_SHAPE)


def test_fields_match_pipeline(folders, loaded):
    pipe, text = pipeline(folders["wan21"]), loaded["wan21"].text
    with torch.no_grad():  # as WanPipeline.__call__ (UMT5 under autograd rounds differently)
        embeds, neg = pipe.encode_prompt(PROMPTS, "ugly", device="cpu", max_sequence_length=T5_TOKENS)
    cond = text.cond(PROMPTS, "ugly")
    close(cond["prompt_embeds"], embeds, 0)
    close(cond.null(2)["prompt_embeds"], neg, 0)
    assert cond["prompt_embeds"].shape == (2, T5_TOKENS, 32)
    assert load(folders["wan21"]).text.name == text.name != load_wan(folders["wan21"], resolution=RESOLUTION,
                                                                      num_frames=NUM_FRAMES).text.name


def test_schedule_and_features(folders, loaded):
    for name in ("wan21", "wan21_euler"):
        schedule, steps = wan_schedule(folders[name])
        assert schedule.shift == SHIFT and steps == 1000
    d, cond = loaded["wan22"].denoiser, loaded["wan22"].text.cond(PROMPTS)
    x, sigma = latents(), [0.95, 0.4]
    f = d.features(x, torch.tensor(sigma), cond)
    assert f.shape == (2, d.feature_dim)
    # each row: its own expert's last block's output tokens, averaged
    for i, net in enumerate((d.transformer, d.transformer_2)):
        captured = []
        hook = net.blocks[-1].register_forward_hook(lambda m, args, out: captured.append(out))
        net(hidden_states=x[i:i + 1], timestep=torch.tensor([sigma[i] * 1000]),
            encoder_hidden_states=cond["prompt_embeds"][i:i + 1])
        hook.remove()
        close(f[i:i + 1], captured[0].mean(1))


# --- bad folders and keys: one-line errors naming the fix -----------------------------------------------------

def one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_folder_errors(tmp_path, folders):
    with pytest.raises(ConfigError) as e:
        load_wan(None)
    assert "teacher.path is not set" in one_line(e) and "transformer/, vae/, text_encoder/" in one_line(e)
    with pytest.raises(ConfigError) as e:
        load_wan(tmp_path / "nope")
    assert "does not exist" in one_line(e)
    ti2v = shutil.copytree(folders["wan21"], tmp_path / "ti2v")
    edit_json(ti2v / "model_index.json", expand_timesteps=True)
    with pytest.raises(ConfigError) as e:
        load(ti2v)
    assert "sets expand_timesteps" in one_line(e) and "Wan 2.2 A14B" in one_line(e)
    half = shutil.copytree(folders["wan21"], tmp_path / "half")
    edit_json(half / "model_index.json", boundary_ratio=0.9)
    with pytest.raises(ConfigError) as e:
        load(half)
    assert "sets boundary_ratio=0.9 but there is no transformer_2/" in one_line(e)
    ddim = shutil.copytree(folders["wan21"], tmp_path / "ddim")
    edit_json(ddim / "scheduler" / "scheduler_config.json", _class_name="DDIMScheduler")
    with pytest.raises(ConfigError) as e:
        load(ddim)
    assert "names DDIMScheduler; teacher=wan reads UniPCMultistepScheduler" in one_line(e)
    with pytest.raises(ConfigError) as e:
        load_wan(folders["wan21"], resolution=40, num_frames=NUM_FRAMES)
    assert "teacher.resolution=40 must be a positive multiple of 16" in one_line(e)
    with pytest.raises(ConfigError) as e:
        load_wan(folders["wan21"], resolution=RESOLUTION, num_frames=6)
    assert "teacher.num_frames=6 must be 1 + a multiple of 4" in one_line(e)
    broken = shutil.copytree(folders["wan21"], tmp_path / "broken")
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError) as e:
        load(broken)
    assert one_line(e).startswith(f"teacher.path '{broken}': cannot load transformer (")


def test_family_refuses_a_second_guidance(folders):
    from omegaconf import OmegaConf

    from onestep import teachers
    from onestep.config import TeacherConfig

    tc = OmegaConf.structured(TeacherConfig(kind="wan", path=str(folders["wan22"]), guidance=5.0, guidance_2=3.0,
                                            resolution=RESOLUTION, num_frames=NUM_FRAMES,
                                            max_sequence_length=T5_TOKENS))
    with pytest.raises(ConfigError) as e:
        teachers.family("wan").load(OmegaConf.create({"teacher": tc}), "wan", torch.device("cpu"))
    assert "teacher.guidance_2=3.0" in one_line(e) and "set teacher.guidance_2=null" in one_line(e)
    tc.guidance_2 = 5.0
    parts = teachers.family("wan").load(OmegaConf.create({"teacher": tc}), "wan", torch.device("cpu"))
    assert parts.denoiser.data_shape == LATENT_SHAPE and parts.image_size == RESOLUTION
