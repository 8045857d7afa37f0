"""data=video_text (onestep/data/video_text.py): captioned clips read exactly (GIF, WebP, safetensors, .pt), encoded by
the tiny Wan pipeline's own codec (tests/video_fixtures.py) and cached, one-line errors that name the file, and a
3-step `onestep train` of MCM on data videos (mixed_portion < 1, the discriminator's real frames from the videos)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from onestep.data import video_text as V
from onestep.data.text import EmbeddingCache, TextConditioner, square_rgb
from onestep.errors import ConfigError
from video_fixtures import LATENT_SHAPE, NUM_FRAMES, RESOLUTION, T5_TOKENS, make_tiny_wan

#: a few RGB colours: palette frames survive GIF's 256-colour quantisation bit for bit
PALETTE = torch.tensor([[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 128, 255], [40, 200, 90], [250, 200, 10]],
                       dtype=torch.uint8)


def palette_frames(n: int, h: int = RESOLUTION, w: int = RESOLUTION, seed: int = 0) -> torch.Tensor:
    """(n, h, w, 3) uint8 frames of 4x4 blocks in PALETTE colours."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(PALETTE), (n, h // 4, w // 4), generator=g)
    return PALETTE[idx].repeat_interleave(4, 1).repeat_interleave(4, 2)


def write_animated(path, frames: torch.Tensor, caption: str | None = None):
    from PIL import Image

    images = [Image.fromarray(f.numpy()) for f in frames]
    extra = {"lossless": True} if path.suffix == ".webp" else {}
    images[0].save(path, save_all=True, append_images=images[1:], duration=60, loop=0, **extra)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption + "\n")
    return path


def as_video(frames: torch.Tensor) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (3, F, H, W) in [-1, 1], as load_clip returns."""
    return frames.permute(3, 0, 1, 2).float() / 127.5 - 1


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    from onestep.denoisers.wan import load_wan

    folder = make_tiny_wan(tmp_path_factory.mktemp("vdata") / "wan")
    return folder, load_wan(folder, resolution=RESOLUTION, num_frames=NUM_FRAMES, max_sequence_length=T5_TOKENS)


@pytest.fixture()
def clips(tmp_path):
    """Two GIFs (one longer than the teacher's 5 frames), a lossless WebP at another size, a float safetensors clip."""
    root = tmp_path / "clips"
    root.mkdir()
    write_animated(root / "a.gif", palette_frames(NUM_FRAMES + 2, seed=1), "a red square moving left")
    write_animated(root / "b.gif", palette_frames(NUM_FRAMES, seed=2), "a blue circle")
    write_animated(root / "c.webp", palette_frames(NUM_FRAMES, 48, 40, seed=3), "a webp clip")
    g = torch.Generator().manual_seed(4)
    video = torch.rand(3, NUM_FRAMES, RESOLUTION, RESOLUTION, generator=g) * 2 - 1
    save_file({"video": video}, str(root / "d.safetensors"))
    (root / "d.txt").write_text("a preprocessed clip\n")
    return root


class CountingCodec:
    """The tiny Wan codec, counting the videos it encodes."""

    def __init__(self, codec):
        self.codec, self.videos = codec, 0

    def __getattr__(self, name):
        return getattr(self.codec, name)

    def encode(self, videos):
        self.videos += len(videos)
        return self.codec.encode(videos)


def _data(parts, pairs, codec, cache):
    conditioner = TextConditioner(parts.text, EmbeddingCache(parts.text, cache, progress=False), None, parts.image_size)
    return V.video_text_data(pairs, parts.denoiser, codec, conditioner, cache, progress=False)


def test_clips_are_read_exactly(clips, tmp_path):
    from PIL import Image, ImageSequence

    # the first teacher.num_frames frames, bit for bit
    want = as_video(palette_frames(NUM_FRAMES + 2, seed=1)[:NUM_FRAMES])
    assert torch.equal(V.load_clip(clips / "a.gif", RESOLUTION, NUM_FRAMES), want)
    with Image.open(clips / "c.webp") as im:  # resized and center-cropped as image_text's images
        first = square_rgb(next(iter(ImageSequence.Iterator(im))), RESOLUTION)
    webp = V.load_clip(clips / "c.webp", RESOLUTION, NUM_FRAMES)
    assert webp.shape == (3, NUM_FRAMES, RESOLUTION, RESOLUTION) and torch.equal(webp[:, 0], first)
    from safetensors.torch import load_file

    want = load_file(str(clips / "d.safetensors"))["video"]
    assert torch.equal(V.load_clip(clips / "d.safetensors", RESOLUTION, NUM_FRAMES), want)
    frames = palette_frames(NUM_FRAMES, seed=5)
    torch.save(frames.permute(3, 0, 1, 2).contiguous(), tmp_path / "e.pt")  # uint8 (C, F, H, W)
    assert torch.equal(V.load_clip(tmp_path / "e.pt", RESOLUTION, NUM_FRAMES), as_video(frames))
    big = torch.rand(1, NUM_FRAMES, 40, 64) * 2 - 1  # grey, another size: resized and cropped to the square
    torch.save(big, tmp_path / "f.pt")
    assert V.load_clip(tmp_path / "f.pt", RESOLUTION, NUM_FRAMES).shape == (3, NUM_FRAMES, RESOLUTION, RESOLUTION)


def test_mp4_clips_read_through_imageio_where_installed(tmp_path):
    """With imageio's ffmpeg plugin (an optional dependency) an MP4 written by onestep's own writer reads back as its
    first frames, within H.264's loss; without it the clip is the one-line install error."""
    from onestep.data.video import write_mp4

    frames = palette_frames(NUM_FRAMES + 2, RESOLUTION, RESOLUTION + 16, seed=6)
    path = tmp_path / "a.mp4"
    if not V._has_ffmpeg():
        path.write_bytes(b"\x00")
        with pytest.raises(ConfigError, match="pip install imageio\\[ffmpeg\\]"):
            V.load_clip(path, RESOLUTION, NUM_FRAMES)
        return
    write_mp4(path, frames)
    got = V.load_clip(path, RESOLUTION, NUM_FRAMES)
    want = as_video(frames[:NUM_FRAMES, :, 8:8 + RESOLUTION])  # the center crop of the wider frames
    assert got.shape == want.shape and (got - want).abs().mean() < 0.1
    assert (V.load_clip(path, RESOLUTION, 1) - want[:, :1]).abs().mean() < 0.1


def test_latents_are_the_codec_encoding_and_the_cache_is_reused(wan, clips, tmp_path):
    _, parts = wan
    pairs = V.find_video_text_pairs(clips)
    assert [p.name for p, _ in pairs] == ["a.gif", "b.gif", "c.webp", "d.safetensors"]
    assert V.teacher_frames(parts.denoiser, parts.codec) == NUM_FRAMES
    codec = CountingCodec(parts.codec)
    data = _data(parts, pairs, codec, tmp_path / "cache")
    assert codec.videos == len(pairs)
    with torch.no_grad():
        for (path, _), z in zip(pairs, data.latents):
            want = parts.codec.encode(V.load_clip(path, RESOLUTION, NUM_FRAMES)[None])[0]
            assert torch.equal(z, want), path.name
    assert data.captions == [[c] for _, c in pairs]
    b = data.batch(3, torch.device("cpu"))
    assert b.noise.shape == (3, *LATENT_SHAPE) and b.real.shape == (3, *LATENT_SHAPE)
    assert all(any(torch.equal(r, z) for z in data.latents) for r in b.real)
    assert b.cond["prompt_embeds"].shape[0] == 3
    again = CountingCodec(parts.codec)  # a second build reads the cache: nothing is encoded
    assert torch.equal(_data(parts, pairs, again, tmp_path / "cache").latents, data.latents) and again.videos == 0
    # the cache key holds the frame count: another teacher.num_frames encodes anew
    assert sorted(p.name.split("_")[1] for p in (tmp_path / "cache" / "latents").rglob("*.safetensors")) == \
        [f"{RESOLUTION}x{NUM_FRAMES}f.safetensors"] * len(pairs)


def _one_line(exc_info, *parts):
    msg = str(exc_info.value)
    assert "\n" not in msg and all(p in msg for p in parts), msg


def test_bad_clips_fail_with_one_line_naming_the_file(tmp_path, monkeypatch):
    short = write_animated(tmp_path / "short.gif", palette_frames(3), "short")
    with pytest.raises(ConfigError) as e:
        V.load_clip(short, RESOLUTION, NUM_FRAMES)
    _one_line(e, f"'{short}' has 3 frames", f"teacher.num_frames={NUM_FRAMES}")
    broken = {"broken.gif": b"GIF89a not really", "broken.safetensors": b"\x00" * 12, "broken.pt": b"xyz"}
    for name, data in broken.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConfigError) as e:
            V.load_clip(tmp_path / name, RESOLUTION, NUM_FRAMES)
        _one_line(e, f"'{tmp_path / name}' is not a readable video")
    save_file({"x": torch.zeros(3, 5, 8, 8), "y": torch.zeros(1)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(ConfigError) as e:
        V.load_clip(tmp_path / "two.safetensors", RESOLUTION, NUM_FRAMES)
    _one_line(e, "holds 2 tensors")
    torch.save(torch.full((3, 5, 8, 8), 3.0), tmp_path / "range.pt")
    with pytest.raises(ConfigError) as e:
        V.load_clip(tmp_path / "range.pt", RESOLUTION, NUM_FRAMES)
    _one_line(e, "'", "range.pt' has values up to 3", "[-1, 1]")
    (tmp_path / "clip.mp4").write_bytes(b"\x00")
    monkeypatch.setattr(V, "_has_ffmpeg", lambda: False)
    with pytest.raises(ConfigError) as e:
        V.load_clip(tmp_path / "clip.mp4", RESOLUTION, NUM_FRAMES)
    _one_line(e, "clip.mp4", "pip install imageio[ffmpeg]")


def test_folder_errors_name_the_file_or_key(tmp_path):
    write_animated(tmp_path / "a.gif", palette_frames(NUM_FRAMES), "captioned")
    write_animated(tmp_path / "b.gif", palette_frames(NUM_FRAMES))
    with pytest.raises(ConfigError) as e:
        V.find_video_text_pairs(tmp_path)
    _one_line(e, f"'{tmp_path / 'b.gif'}' has no caption", f"'{tmp_path / 'b.txt'}'")
    (tmp_path / "b.txt").write_text("  \n")  # an empty caption is none
    with pytest.raises(ConfigError, match="b.gif' has no caption"):
        V.find_video_text_pairs(tmp_path)
    (tmp_path / "b.txt").write_text("now captioned")
    assert [c for _, c in V.find_video_text_pairs(tmp_path)] == ["captioned", "now captioned"]
    with pytest.raises(ConfigError) as e:
        V.find_video_text_pairs(None)
    _one_line(e, "data.path is not set; pass data.path=<folder of videos")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no video"):
        V.find_video_text_pairs(tmp_path / "empty")


def test_video_text_is_a_wan_data_kind_and_an_image_teacher_is_refused():
    from onestep import teachers
    from onestep.experiment import check_data_kind
    from tests.conftest import compose

    assert "video_text" in teachers.family("wan").data_kinds
    check_data_kind(compose(["teacher=wan", "data=video_text"]))
    with pytest.raises(ConfigError, match="trains on .* not data=video_text"):
        check_data_kind(compose(["teacher=sd15", "data=video_text"]))
    image = SimpleNamespace(data_shape=(4, 8, 8), frame_axis=None)
    with pytest.raises(ConfigError, match="data=video_text needs a text-to-video teacher"):
        V.video_text_data([], image, object(), object(), "/tmp")
    with pytest.raises(ConfigError, match="declares no frame_axis"):
        V.teacher_frames(SimpleNamespace(data_shape=(4, 2, 8, 8), frame_axis=None),
                         SimpleNamespace(temporal_downsample=4))
    assert V.teacher_frames(SimpleNamespace(data_shape=(13, 16, 8, 8), frame_axis=0),
                            SimpleNamespace(temporal_downsample=4)) == 49  # CogVideoX's (F, C, h, w): 49 frames


def test_experiment_builds_video_text_and_reads_captions_before_any_model(wan, clips, tmp_path):
    from onestep.experiment import build
    from tests.conftest import compose

    folder, parts = wan
    args = ["teacher=wan", "data=video_text", f"data.path={clips}", f"teacher.resolution={RESOLUTION}",
            f"teacher.num_frames={NUM_FRAMES}", f"teacher.max_sequence_length={T5_TOKENS}", f"data.cache={tmp_path}/c",
            "trainer.cpu=true"]
    setup = build(compose([*args, f"teacher.path={folder}"]), tmp_path, progress=False)
    assert setup.data.latents.shape == (4, *LATENT_SHAPE) and setup.data.data_shape == LATENT_SHAPE
    (clips / "d.txt").unlink()  # a missing caption stops the run before the (here absent) teacher is loaded
    with pytest.raises(ConfigError, match="d.safetensors' has no caption"):
        build(compose([*args, f"teacher.path={tmp_path}/no_such_model"]), tmp_path, progress=False)


@pytest.mark.slow
def test_wan_mcm_on_data_videos_cli(wan, clips, tmp_path):
    """MCM's mixed trajectories (mixed_portion 0.5) and its discriminator's real frames come from the data videos."""
    from test_wan_recipes import _train_cli

    folder, _ = wan
    out = tmp_path / "out"
    out.mkdir()
    run, last = _train_cli(["experiment=wan_mcm", f"teacher.path={folder}", "data=video_text", f"data.path={clips}",
                            "objective.mixed_portion=0.5"], out)
    assert all(math.isfinite(last[k]) for k in ("gen/consistency", "gen/adv_g", "critic/adv_d"))
    assert (run / "checkpoints" / "step_00000003" / "generator.safetensors").is_file()
    assert len(list((out / "cache" / "latents").rglob(f"*_{RESOLUTION}x{NUM_FRAMES}f.safetensors"))) == 4
