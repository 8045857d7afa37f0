"""The CogVideoX adapter against diffusers' own computation, on tiny random pipeline folders (tests/cog_fixtures.py).

The strongest check runs CogVideoXPipeline itself (its DDIM scheduler, the folder's shifted zero-terminal-SNR table)
and records every transformer call: each guided prediction it forms must equal ``Guided(denoiser, w)`` at the same
latents and timestep, and the latents it returns must equal onestep's DDIM sampler from the same generator's noise,
prompt encoding, rotary embeddings and classifier-free guidance included.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from cog_fixtures import FRAMES, LATENT_SHAPE, SCHEDULER, make_tiny_cogvideox, transformer
from conftest import compose, one_line, write_scheduler
from flow_fixtures import T5_DIM, T5_TOKENS
from safetensors.torch import load_file
from sd_fixtures import write_prompts

from onestep import teachers
from onestep.denoisers.base import Guided, guided
from onestep.denoisers.cogvideox import CogVideoXTextEncoder, cogvideox_schedule, load_cogvideox
from onestep.errors import ConfigError
from onestep.sampling import sample
from onestep.schedules import ZERO_SNR_LOGSNR

PROMPTS = ["a red cat", "two blue dogs!"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cogvideox")
    return {"rotary": make_tiny_cogvideox(root / "rotary"), "sincos": make_tiny_cogvideox(root / "sincos", False)}


@pytest.fixture(scope="module")
def parts(folders):
    return {name: load_cogvideox(folder, max_sequence_length=T5_TOKENS) for name, folder in folders.items()}


def pipeline(folder):
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(str(folder), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pipeline(pipe, seed, steps, w, negative, **kwargs):
    """CogVideoXPipeline.__call__ from ``seed``'s draws, recording each transformer call's keyword inputs and output."""
    calls = []
    hook = pipe.transformer.register_forward_hook(lambda m, args, kw, out: calls.append((kw, out[0])),
                                                  with_kwargs=True)
    try:
        out = pipe(PROMPTS, negative_prompt=negative, num_inference_steps=steps, guidance_scale=w,
                   max_sequence_length=T5_TOKENS, generator=torch.Generator().manual_seed(seed), **kwargs).frames
    finally:
        hook.remove()
    return out, calls


@pytest.mark.parametrize("name,w,negative,steps", [("rotary", 1.0, None, 2), ("rotary", 6.0, None, 2),
                                                   ("rotary", 6.0, "blurry", 1), ("sincos", 6.0, None, 2)])
def test_pipeline_equals_guided_teacher_and_ddim_sampler(folders, parts, name, w, negative, steps):
    pipe, p = pipeline(folders[name]), parts[name]
    ref, calls = run_pipeline(pipe, 3, steps, w, negative, output_type="latent")
    timesteps = pipe.scheduler.timesteps
    assert len(calls) == steps and timesteps[0] == 999  # trailing spacing starts at the zero-SNR row
    ts = timesteps.double() / 999
    cond = p.text.cond(PROMPTS, negative)
    model = Guided(p.denoiser, w)
    for (kw, out), k in zip(calls, timesteps):
        assert kw["timestep"].dtype == torch.int64 and torch.equal(kw["timestep"], k.expand(len(out)))
        # the pipeline stacks [unconditional, conditional] under CFG, and forms u + w (c - u) in float32
        x = kw["hidden_states"][-2:]
        want = out.float()
        if w > 1:
            u, c = want.chunk(2)
            want = u + w * (c - u)
        torch.testing.assert_close(model(x, torch.full((2,), k / 999), cond), want, rtol=0, atol=1e-5)
        rotary = p.denoiser.rotary(*LATENT_SHAPE[:1], *LATENT_SHAPE[2:], x.device)
        if name == "rotary":
            assert all(torch.equal(a, b) for a, b in zip(rotary, kw["image_rotary_emb"]))
        else:
            assert rotary is None and kw["image_rotary_emb"] is None
    noise = torch.randn((2, *p.denoiser.data_shape), generator=torch.Generator().manual_seed(3))
    assert p.denoiser.data_shape == LATENT_SHAPE
    ours = sample(p.denoiser, noise, ts, cond, method="ddim", guidance=w)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_schedule_equals_scheduler_table(tmp_path):
    from diffusers import CogVideoXDDIMScheduler

    t = torch.arange(1000, dtype=torch.float64) / 999
    for config in (SCHEDULER, {}, {**SCHEDULER, "rescale_betas_zero_snr": False, "snr_shift_scale": 1.5},
                   {"beta_schedule": "scaled_linear", "snr_shift_scale": 1.0, "prediction_type": "epsilon"}):
        folder = write_scheduler(tmp_path / str(len(list(tmp_path.iterdir()))),
                                 _class_name="CogVideoXDDIMScheduler", **config)
        schedule, prediction = cogvideox_schedule(folder)
        want = CogVideoXDDIMScheduler(**config).alphas_cumprod.double()
        torch.testing.assert_close(schedule.alpha(t) ** 2, want, rtol=1e-12, atol=1e-15 if want[-1] else 1e-17)
        assert prediction == {"v_prediction": "v"}.get(config.get("prediction_type"), "eps")
    zero = cogvideox_schedule(write_scheduler(tmp_path / "zero", _class_name="CogVideoXDDIMScheduler", **SCHEDULER))[0]
    assert zero.table_logsnr[-1] == ZERO_SNR_LOGSNR and zero.sigma(torch.tensor(1.0)) == 1
    # between the last two rows and at them, log-SNR and its t-derivative stay finite
    t = torch.tensor([998 / 999, 998.5 / 999, 1.0], requires_grad=True)
    assert zero.logsnr(t).isfinite().all() and torch.autograd.grad(zero.logsnr(t).sum(), t)[0].isfinite().all()
    assert torch.autograd.grad(zero.alpha(t).sum(), t)[0].isfinite().all()


def test_schedule_rejects(tmp_path):
    with pytest.raises(ConfigError) as e:
        cogvideox_schedule(write_scheduler(tmp_path / "ddim", _class_name="DDIMScheduler"))
    assert "names DDIMScheduler; teacher=cogvideox reads CogVideoXDDIMScheduler or CogVideoXDPMScheduler" in one_line(e)
    with pytest.raises(ConfigError, match="beta_schedule 'squaredcos_cap_v2'"):
        cogvideox_schedule(write_scheduler(tmp_path / "cos", _class_name="CogVideoXDPMScheduler",
                                           beta_schedule="squaredcos_cap_v2"))
    with pytest.raises(ConfigError, match="snr_shift_scale=0 must be > 0"):
        cogvideox_schedule(write_scheduler(tmp_path / "zero", _class_name="CogVideoXDDIMScheduler", snr_shift_scale=0))


def test_text_fields(folders, parts):
    text = parts["rotary"].text
    cond = text.cond(PROMPTS, "blurry")
    assert set(cond.fields) == {"prompt_embeds"} and cond["prompt_embeds"].shape == (2, T5_TOKENS, T5_DIM)
    pipe = pipeline(folders["rotary"])
    embeds, neg = pipe.encode_prompt(PROMPTS, negative_prompt="blurry", max_sequence_length=T5_TOKENS, device="cpu")
    # a T5 loaded by the pipeline and one loaded alone agree to float32 rounding (their attention kernels may differ)
    torch.testing.assert_close(cond["prompt_embeds"], embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(cond.null()["prompt_embeds"], neg, rtol=0, atol=1e-5)
    _, empty = pipe.encode_prompt(PROMPTS, max_sequence_length=T5_TOKENS, device="cpu")
    torch.testing.assert_close(text.null_fields()["prompt_embeds"], empty[:1], rtol=0, atol=1e-5)
    # the default length is the pipeline's, and the length is part of the cache identity
    long = CogVideoXTextEncoder(folders["rotary"])
    assert long.encode(["x"])["prompt_embeds"].shape == (1, 226, T5_DIM) and long.name != text.name
    with pytest.raises(ConfigError, match="teacher.max_sequence_length=0 must be a positive"):
        CogVideoXTextEncoder(folders["rotary"], max_sequence_length=0)


def test_codec_matches_pipeline_decode(folders, parts):
    p = parts["rotary"]
    codec = p.codec
    assert (codec.downsample, codec.temporal_downsample, codec.scaling, codec.pad, p.image_size) == (4, 4, 0.7, 0, 32)
    pipe = pipeline(folders["rotary"])
    latents, _ = run_pipeline(pipe, 5, 1, 1.0, None, output_type="latent")
    videos, _ = run_pipeline(pipe, 5, 1, 1.0, None, output_type="pt")  # (B, F, C, H, W) in [0, 1]
    decoded = codec.decode(latents)
    assert decoded.shape == (2, 3, FRAMES, 32, 32)
    # the pipeline maps to [0, 1] before clamping, onestep clamps to [-1, 1] first: equal to float32 rounding
    torch.testing.assert_close((decoded + 1) / 2, videos.transpose(1, 2), rtol=0, atol=1e-5)
    z = codec.encode(decoded)
    with torch.no_grad():
        want = codec.vae.encode(decoded).latent_dist.mean * 0.7
    assert z.shape == (2, *LATENT_SHAPE) and torch.equal(z, want.transpose(1, 2))


def test_patch_size_t_pads_like_the_pipeline(tmp_path, folders):
    """CogVideoX 1.5 patches 2 latent frames at a time: 3 latent frames are drawn as 4, the first dropped at decoding."""
    folder = shutil.copytree(folders["rotary"], tmp_path / "v15")
    shutil.rmtree(folder / "transformer")
    torch.manual_seed(0)
    transformer(patch_size_t=2, patch_bias=False).save_pretrained(str(folder / "transformer"))
    p = load_cogvideox(folder, max_sequence_length=T5_TOKENS)
    assert p.denoiser.data_shape == (4, 4, 8, 8) and p.codec.pad == 1
    pipe = pipeline(folder)
    latents, calls = run_pipeline(pipe, 2, 1, 6.0, None, output_type="latent")
    videos, _ = run_pipeline(pipe, 2, 1, 6.0, None, output_type="pt")
    noise = torch.randn((2, *p.denoiser.data_shape), generator=torch.Generator().manual_seed(2))
    ours = sample(p.denoiser, noise, [1.0], p.text.cond(PROMPTS), method="ddim", guidance=6.0)
    torch.testing.assert_close(ours, latents, rtol=0, atol=1e-5)
    torch.testing.assert_close((p.codec.decode(latents) + 1) / 2, videos.transpose(1, 2), rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match="needs 1 padding latent frame"):
        p.codec.encode(torch.zeros(1, 3, FRAMES, 32, 32))
    assert load_cogvideox(folder, num_frames=13, max_sequence_length=T5_TOKENS).codec.pad == 0


def test_features_and_dtype(parts):
    p = parts["rotary"]
    d = p.denoiser
    x = torch.randn(2, *LATENT_SHAPE, generator=torch.Generator().manual_seed(0))
    seen = []
    hook = d.transformer.transformer_blocks[-1].register_forward_hook(lambda m, a, out: seen.append(out))
    try:
        f = d.features(x, 0.5, p.text.cond(PROMPTS))
    finally:
        hook.remove()
    assert f.shape == (2, d.feature_dim) == (2, 32) and torch.isfinite(f).all()
    # the last block returns (video tokens, text tokens): the features are the video's 3 frames x 4 x 4 patches
    video = [out for out in seen[0] if out.shape[1] == 3 * 4 * 4]
    assert len(video) == 1 and torch.equal(f, video[0].mean(1))
    assert not torch.allclose(f, d.features(x, 0.5, p.text.cond(["green", "grass"])))
    out = d(x.double(), 0.5, p.text.cond(PROMPTS))
    assert out.dtype == torch.float64 and torch.allclose(out.float(), d(x, 0.5, p.text.cond(PROMPTS)))
    # single frames (MCM's image discriminator reads them): frame_axis 0, rotary embeddings for one frame
    assert d.frame_axis == 0 and d(x[:, :1], 0.5, p.text.cond(PROMPTS)).shape == (2, 1, *LATENT_SHAPE[1:])


def test_sizes(folders):
    p = load_cogvideox(folders["rotary"], num_frames=5, resolution=64, max_sequence_length=T5_TOKENS)
    assert p.denoiser.data_shape == (2, 4, 16, 16) and p.image_size == 64
    for kwargs, words in (({"num_frames": 8}, "teacher.num_frames=8 must be 1 + a multiple of 4"),
                          ({"resolution": 30}, "teacher.resolution=30 must be a positive multiple of the VAE's "
                                                "downsampling 4"),
                          ({"resolution": 36}, "latents (3, 4, 9, 9) do not split into the transformer's patches")):
        with pytest.raises(ConfigError) as e:
            load_cogvideox(folders["rotary"], **kwargs)
        assert words in one_line(e)


def test_bad_folders(tmp_path, folders):
    with pytest.raises(ConfigError) as e:
        load_cogvideox(None)
    assert "teacher.path is not set" in one_line(e) and "model_index.json, transformer/, vae/" in one_line(e)
    with pytest.raises(ConfigError) as e:
        load_cogvideox(tmp_path / "nope")
    assert "does not exist" in one_line(e) and "text_encoder/, tokenizer/, scheduler/" in one_line(e)
    (tmp_path / "plain").mkdir()
    with pytest.raises(ConfigError, match="is not a diffusers pipeline folder .no model_index.json."):
        load_cogvideox(tmp_path / "plain")
    # a Sana folder has every sub-folder CogVideoX needs: its model_index.json names it
    other = shutil.copytree(folders["rotary"], tmp_path / "sana")
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "SanaPipeline"}))
    with pytest.raises(ConfigError) as e:
        load_cogvideox(other)
    assert "holds a SanaPipeline (model_index.json), not a cogvideox pipeline; use teacher=sana" in one_line(e)
    broken = shutil.copytree(folders["rotary"], tmp_path / "broken")
    (broken / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError) as e:
        load_cogvideox(broken)
    assert one_line(e).startswith(f"teacher.path '{broken}': cannot load vae (")
    assert one_line(e).endswith("expected a diffusers cogvideox pipeline folder")
    wrong = shutil.copytree(folders["rotary"], tmp_path / "wrong")
    write_scheduler(wrong, _class_name="FlowMatchEulerDiscreteScheduler")
    with pytest.raises(ConfigError, match="names FlowMatchEulerDiscreteScheduler; teacher=cogvideox reads"):
        load_cogvideox(wrong)


def test_needs_prompts(parts):
    p = parts["rotary"]
    with pytest.raises(ConfigError, match="needs prompt conditioning"):
        guided(p.denoiser, 6.0).x0(torch.zeros(2, *LATENT_SHAPE), 1.0, None)


def test_family_loads_the_folder(folders):
    cfg = compose(["teacher=cogvideox", f"teacher.path={folders['rotary']}", f"teacher.max_sequence_length={T5_TOKENS}"])
    fam = teachers.family("cogvideox")
    p = fam.load(cfg, "cogvideox", torch.device("cpu"))
    assert p.denoiser.data_shape == LATENT_SHAPE and p.text.max_sequence_length == T5_TOKENS
    cfg = compose(["teacher=cogvideox", f"teacher.path={folders['rotary']}", "teacher.num_frames=5",
                   "teacher.resolution=64"])
    p = fam.load(cfg, "cogvideox", torch.device("cpu"))
    assert p.denoiser.data_shape == (2, 4, 16, 16) and p.text.max_sequence_length == 226


def test_video_text_needs_square_frames(tmp_path, folders):
    """CogVideoX's default size is not square (480x720); data=video_text crops clips square, so it needs
    teacher.resolution."""
    wide = shutil.copytree(folders["rotary"], tmp_path / "wide")
    config = json.loads((wide / "transformer" / "config.json").read_text())
    (wide / "transformer" / "config.json").write_text(json.dumps({**config, "sample_width": 12}))
    fam = teachers.family("cogvideox")
    base = ["teacher=cogvideox", f"teacher.path={wide}", f"teacher.max_sequence_length={T5_TOKENS}"]
    assert fam.load(compose(base), "cogvideox", torch.device("cpu")).denoiser.data_shape == (3, 4, 8, 12)
    with pytest.raises(ConfigError) as e:
        fam.load(compose([*base, "data=video_text"]), "cogvideox", torch.device("cpu"))
    assert "data=video_text makes square frames" in one_line(e) and "generates 32x48 videos" in one_line(e)
    p = fam.load(compose([*base, "data=video_text", "teacher.resolution=32"]), "cogvideox", torch.device("cpu"))
    assert p.denoiser.data_shape == (3, 4, 8, 8)
    assert fam.pipeline("cogvideox") == "CogVideoXPipeline" and p.denoiser.prediction == "v"


#: 3 CPU steps of the shipped experiment on the tiny folder (fp32: bf16 on the CPU is slow and the check is wiring)
FAST = ["trainer.steps=3", "trainer.batch_size=2", "trainer.progress=false", "eval.num_samples=2",
        "eval.teacher_steps=[2]", "trainer.checkpoint_every=3", "trainer.sample_every=0", "trainer.frozen_dtype=fp32",
        "trainer.gradient_checkpointing=false", f"teacher.max_sequence_length={T5_TOKENS}"]


@pytest.mark.slow
def test_cogvideox_dmd2_cli(folders, tmp_path):
    """experiment=cogvideox_dmd2 through `onestep train`: finite losses, a checkpoint and the video sample panels."""
    prompts = write_prompts(tmp_path / "prompts.txt", PROMPTS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-m", "onestep.cli", "train", "experiment=cogvideox_dmd2",
                        f"teacher.path={folders['rotary']}", f"data.path={prompts}", f"out_root={tmp_path}", *FAST],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = [p for p in (tmp_path / "cogvideox_dmd2").iterdir() if p.is_dir()]
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    losses = {k: v for s in stats for k, v in s.items() if k.endswith("loss")}
    assert {"gen/loss", "critic/loss"} <= set(losses) and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    assert load_file(str(ckpt / "generator.safetensors"))
    assert (run / "samples.png").stat().st_size > 500 and (run / "samples.gif").read_bytes()[:6] == b"GIF89a"
    # `onestep sample` on the run: an animated grid of the student's videos
    r = subprocess.run([sys.executable, "-m", "onestep.cli", "sample", f"run_dir={run}", "num=2", "seed=0",
                        f"prompt={PROMPTS[0]}", f"out={tmp_path / 'v.gif'}"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    from PIL import Image

    with Image.open(tmp_path / "v.gif") as im:
        assert im.n_frames == FRAMES


@pytest.mark.slow
def test_export_round_trip(folders, tmp_path):
    """A 4-step ddim student (CogVideoXDDIMScheduler) and a 2-step re-noising LoRA student (LCMScheduler on the shifted
    table's betas; merged and LoRA-only): CogVideoXPipeline folders, run where `import onestep` fails, equal to
    `onestep sample`; a ddim step count the scheduler cannot run is refused."""
    from export_check import clean_process
    from test_export import export_and_sample, train_run

    from onestep.export.pipelines import export
    from onestep.runs import load_run

    prompts = write_prompts(tmp_path / "prompts.txt", PROMPTS)
    small = [f"data.path={prompts}", "trainer.steps=2", "trainer.batch_size=2", "trainer.progress=false",
             "eval.num_samples=2", "eval.teacher_steps=[1]", "eval.plot=false", "trainer.checkpoint_every=2",
             "trainer.frozen_dtype=fp32", "trainer.gradient_checkpointing=false", f"teacher.num_frames={FRAMES}",
             f"teacher.max_sequence_length={T5_TOKENS}", "experiment=cogvideox_dmd2", f"teacher.path={folders['rotary']}"]
    cases = {"ddim4": ["eval.student_steps=[4]"],
             "renoise2": ["generator.method=renoise", "generator.steps=2", "eval.student_steps=[2]",
                          "generator.lora.rank=4"]}
    jobs, expected = [], []
    for name, overrides in cases.items():
        run = train_run([*small, *overrides], tmp_path / name)
        for suffix, kw in [("", {})] + ([("_lora", {"lora_only": True})] if name == "renoise2" else []):
            out = tmp_path / f"export_{name}{suffix}"
            expected.append(export_and_sample(run, out, n=2, seed=11, prompt=PROMPTS[0], **kw))
            jobs.append({"folder": str(out), "n": 2, "seed": 11, "prompt": PROMPTS[0],
                         "out": str(tmp_path / f"clean_{name}{suffix}.safetensors")})
            info = json.loads((out / "onestep_export.json").read_text())
            assert info["pipeline_class"] == "CogVideoXPipeline" and info["call"] == {
                "num_inference_steps": int(name[-1]), "guidance_scale": 1.0, "height": None, "width": None,
                "num_frames": FRAMES, "max_sequence_length": T5_TOKENS}
            scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
            assert scheduler["_class_name"] == {"ddim4": "CogVideoXDDIMScheduler", "renoise2": "LCMScheduler"}[name]
    for got, want, job in zip(clean_process(jobs, tmp_path), expected, jobs):
        assert got.shape == want.shape == (2, 3, FRAMES, 32, 32), job["folder"]
        assert (got - want).abs().max() <= 1e-4, (job["folder"], (got - want).abs().max())
    run = load_run(train_run([*small, "generator.steps=3", "trainer.steps=1", "trainer.checkpoint_every=1",
                              "eval.student_steps=[3]"], tmp_path / "ddim3"), torch.device("cpu"), frozen_dtype="fp32")
    with pytest.raises(ConfigError) as e:
        export(run, tmp_path / "export_ddim3")
    assert "a 3-step ddim student's timesteps [999, 666, 333] are not CogVideoXDDIMScheduler's trailing" in one_line(e)
