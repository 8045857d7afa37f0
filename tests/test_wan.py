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


@pytest.mark.parametrize("name", ["wan21", "wan22"])
def test_the_start_is_the_pipelines_sigma_1(folders, loaded, name):
    """At t_max the adapter is the pipeline's first step (sigma 1, timestep 1000): x0 = x - u exactly."""
    pipe, d = pipeline(folders[name]), loaded[name].denoiser
    x, cond = latents(), loaded[name].text.cond(PROMPTS)
    close(d.x0(x, torch.full((2,), d.schedule.t_max), cond), x - reference(pipe, x, [1.0, 1.0]))


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


def test_family_refuses_a_second_guidance_on_one_expert(folders):
    from omegaconf import OmegaConf

    from onestep import teachers
    from onestep.config import TeacherConfig

    tc = OmegaConf.structured(TeacherConfig(kind="wan", path=str(folders["wan21"]), guidance=5.0, guidance_2=3.0,
                                            resolution=RESOLUTION, num_frames=NUM_FRAMES,
                                            max_sequence_length=T5_TOKENS))
    with pytest.raises(ConfigError) as e:
        teachers.family("wan").load(OmegaConf.create({"teacher": tc}), "wan", torch.device("cpu"))
    assert "teacher.guidance_2=3.0" in one_line(e) and "set teacher.guidance_2=null" in one_line(e)
    tc.path = str(folders["wan22"])
    parts = teachers.family("wan").load(OmegaConf.create({"teacher": tc}), "wan", torch.device("cpu"))
    assert parts.denoiser.data_shape == LATENT_SHAPE and parts.image_size == RESOLUTION
    assert parts.denoiser.guidance_scales == (5.0, 3.0)


# --- video plumbing: files, panels, the CLI ----------------------------------------------------------------------

def test_video_grid_and_files(tmp_path, monkeypatch):
    from PIL import Image

    from onestep.data import video
    from onestep.export.sample import check_request, write_images

    videos = torch.rand(3, 3, NUM_FRAMES, 8, 8)
    frames = video.video_grid(videos * 2 - 1, nrow=2, padding=2)
    assert frames.shape == (NUM_FRAMES, 2 + 2 * 10, 2 + 2 * 10, 3) and frames.dtype == torch.uint8
    # frame f of video 1 sits in the grid's second tile of the first row
    close(frames[2, 2:10, 12:20].permute(2, 0, 1).float(), (videos[1, :, 2] * 255).round(), 0)
    gif = write_images(videos, tmp_path / "v.gif")
    with Image.open(gif) as im:
        assert im.n_frames == NUM_FRAMES and im.size == (22, 22)
    write_images(videos, tmp_path / "v.safetensors")
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / "v.safetensors"))["videos"], videos)
    with pytest.raises(ConfigError, match="these are videos; write them as .gif, .mp4 or .safetensors"):
        write_images(videos, tmp_path / "v.png")
    with pytest.raises(ConfigError, match="these are images; write them as .png or .safetensors"):
        write_images(videos[:, :, 0], tmp_path / "i.gif")
    monkeypatch.setattr(video.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError) as e:
        check_request(2, str(tmp_path / "v.mp4"), None)
    assert one_line(e) == (f"out='{tmp_path / 'v.mp4'}': writing MP4 needs imageio with ffmpeg (pip install "
                           "imageio[ffmpeg]); or pass out=<file>.gif or out=<file>.safetensors")


def test_video_evaluator_panels(tmp_path, loaded):
    from PIL import Image

    from onestep.eval.video_eval import TextVideoEvaluator

    ev = TextVideoEvaluator(loaded["wan21"].codec)
    cond = loaded["wan21"].text.cond(PROMPTS)
    assert ev.metrics(latents(), cond) == {} and "no video metric" in ev.what
    ev.plot(tmp_path / "samples.png", {"teacher": (latents(seed=1), cond), "student": (latents(seed=2), cond)})
    with Image.open(tmp_path / "samples.gif") as im:  # two panels x two videos, animated over the frames
        assert im.n_frames == NUM_FRAMES and im.size == (2 + 2 * (RESOLUTION + 2), 2 + 2 * (RESOLUTION + 2))
    assert (tmp_path / "samples.png").stat().st_size > 1000


def _onestep(*args, cwd):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "onestep.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


FAST = ["trainer.steps=3", "trainer.batch_size=2", "trainer.progress=false", "eval.num_samples=2",
        "eval.teacher_steps=[2]", "trainer.checkpoint_every=3", "trainer.sample_every=0", "trainer.cpu=true",
        f"teacher.resolution={RESOLUTION}", f"teacher.num_frames={NUM_FRAMES}", f"teacher.max_sequence_length={T5_TOKENS}"]


@pytest.mark.slow
@pytest.mark.parametrize("experiment,name", [("wan_dmd2", "wan21"), ("wan22_dmd2", "wan22")])
def test_train_and_sample_through_the_cli(folders, tmp_path, experiment, name):
    """3 DMD2 steps on the tiny Wan 2.1 / Wan 2.2 (two experts) folders: finite losses, a checkpoint, video panels;
    then `onestep sample` writes a GIF grid and the videos as safetensors."""
    from PIL import Image
    from safetensors.torch import load_file
    from sd_fixtures import write_prompts

    prompts = write_prompts(tmp_path / "prompts.txt", PROMPTS)
    r = _onestep("train", f"experiment={experiment}", f"teacher.path={folders[name]}", f"data.path={prompts}",
                 f"out_root={tmp_path}", *FAST, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    (run,) = [p for p in (tmp_path / experiment).iterdir() if p.is_dir()]
    stats = [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]
    losses = {k: v for s in stats for k, v in s.items() if k.endswith("loss")}
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
    gen = load_file(str(sorted((run / "checkpoints").iterdir())[-1] / "generator.safetensors"))
    assert gen and all("lora_" in k for k in gen)
    assert any("transformer_2" in k for k in gen) == (name == "wan22")  # both experts get adapters
    with Image.open(run / "samples.gif") as im:
        assert im.n_frames == NUM_FRAMES
    for out in ("v.gif", "v.safetensors"):
        s = _onestep("sample", f"run_dir={run}", "num=3", "seed=0", "prompt=a red cat", f"out={tmp_path / out}",
                     "cpu=true", cwd=tmp_path)
        assert s.returncode == 0, s.stderr[-2000:]
    videos = load_file(str(tmp_path / "v.safetensors"))["videos"]
    assert videos.shape == (3, 3, NUM_FRAMES, RESOLUTION, RESOLUTION) and 0 <= videos.min() <= videos.max() <= 1
    with Image.open(tmp_path / "v.gif") as im:
        assert im.n_frames == NUM_FRAMES


# --- export: a WanPipeline folder that plain diffusers runs equals `onestep sample` --------------------------------

def _grid(k: int) -> list[float]:
    """The t-list a k-step student must be trained on to export: the stock FlowMatchEulerDiscreteScheduler's (the
    folders' shift) that WanPipeline runs for k steps, its first sigma 1 standing for the student's t_max."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from onestep.schedules import RectifiedFlow

    s = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    s.set_timesteps(k)
    return [RectifiedFlow().t_max, *s.sigmas[1:-1].tolist()]


@pytest.mark.slow
def test_export_round_trip(folders, tmp_path):
    """Wan 2.1 students of 1 step (merged and LoRA-only) and 2 re-noising steps, and a two-expert Wan 2.2 student
    of 2 steps (one on each expert): WanPipeline folders, run where `import onestep` fails, equal `onestep sample`."""
    from export_check import clean_process
    from sd_fixtures import write_prompts
    from test_export import export_and_sample, train_run

    prompts = write_prompts(tmp_path / "prompts.txt", PROMPTS)
    small = [f"data.path={prompts}", "trainer.steps=2", "trainer.batch_size=2", "trainer.progress=false",
             "eval.num_samples=2", "eval.teacher_steps=[1]", "eval.plot=false", "trainer.checkpoint_every=2",
             f"teacher.resolution={RESOLUTION}", f"teacher.num_frames={NUM_FRAMES}",
             f"teacher.max_sequence_length={T5_TOKENS}", "eval.student_steps=[1]"]
    grid = "generator.ts=[" + ",".join(map(repr, _grid(2))) + "]"
    cases = {"wan21_1": ["experiment=wan_dmd2", f"teacher.path={folders['wan21']}", "generator.steps=1"],
             "wan21_2": ["experiment=wan_dmd2", f"teacher.path={folders['wan21']}", grid],
             "wan22_2": ["experiment=wan22_dmd2", f"teacher.path={folders['wan22']}", grid,
                         "generator.lora.rank=null", "critic.lora.rank=null"]}
    jobs, expected = [], []
    for name, overrides in cases.items():
        run = train_run([*overrides, *small], tmp_path / name)
        for suffix, kw in [("", {})] + ([("_lora", {"lora_only": True})] if name == "wan21_1" else []):
            out = tmp_path / f"export_{name}{suffix}"
            expected.append(export_and_sample(run, out, n=2, seed=11, prompt=PROMPTS[0], **kw))
            jobs.append({"folder": str(out), "n": 2, "seed": 11, "prompt": PROMPTS[0],
                         "out": str(tmp_path / f"clean_{name}{suffix}.safetensors")})
            info = json.loads((out / "onestep_export.json").read_text())
            assert info["pipeline_class"] == "WanPipeline" and info["call"] == {
                "num_inference_steps": int(name[-1]), "guidance_scale": 1.0, "height": RESOLUTION,
                "width": RESOLUTION, "num_frames": NUM_FRAMES, "max_sequence_length": T5_TOKENS}
            assert (out / "transformer_2").is_dir() == (name == "wan22_2")
            if name == "wan21_2" and not kw:  # `onestep sample run_dir=<export>`: the pipeline's frames, as videos
                from onestep.export.sample import sample_export

                assert (sample_export(out, 2, 11, prompt=PROMPTS[0]) - expected[-1]).abs().max() <= 1e-4
    for got, want, job in zip(clean_process(jobs, tmp_path), expected, jobs):
        assert got.shape == want.shape == (2, 3, NUM_FRAMES, RESOLUTION, RESOLUTION), job["folder"]
        assert (got - want).abs().max() <= 1e-4, (job["folder"], (got - want).abs().max())
    # the two-expert student's experts are its own: the export's transformer_2 is not the teacher's
    from diffusers import WanTransformer3DModel

    exported = WanTransformer3DModel.from_pretrained(str(tmp_path / "export_wan22_2"), subfolder="transformer_2")
    teacher = WanTransformer3DModel.from_pretrained(str(folders["wan22"]), subfolder="transformer_2")
    assert any((a - b).abs().max() > 0 for a, b in zip(exported.parameters(), teacher.parameters()))


@pytest.mark.slow
def test_export_refusals(folders, tmp_path):
    """A 2-step student on its default t-list (not the stock scheduler's grid) and LoRA-only two-expert students are
    refused in one line naming the fix."""
    from sd_fixtures import write_prompts
    from test_export import train_run

    from onestep.export.pipelines import export
    from onestep.runs import load_run

    prompts = write_prompts(tmp_path / "prompts.txt", PROMPTS)
    small = [f"data.path={prompts}", "trainer.steps=1", "trainer.batch_size=2", "trainer.progress=false",
             "eval.num_samples=2", "eval.teacher_steps=[1]", "eval.plot=false", "trainer.checkpoint_every=1",
             f"teacher.resolution={RESOLUTION}", f"teacher.num_frames={NUM_FRAMES}",
             f"teacher.max_sequence_length={T5_TOKENS}", "eval.student_steps=[1]", "generator.steps=2"]
    run = load_run(train_run(["experiment=wan22_dmd2", f"teacher.path={folders['wan22']}", *small],
                             tmp_path / "run"), torch.device("cpu"), frozen_dtype="fp32")
    with pytest.raises(ConfigError) as e:
        export(run, tmp_path / "out")
    grid = ", ".join(map(repr, _grid(2)))
    assert "WanPipeline calls scheduler.set_timesteps(2) and takes no sigmas" in one_line(e)
    assert one_line(e).endswith(f"train it with generator.ts=[{grid}] to export it")
    with pytest.raises(ConfigError) as e:
        export(run, tmp_path / "out", lora_only=True)
    assert "the student holds 2 networks (transformer, transformer_2)" in one_line(e)
