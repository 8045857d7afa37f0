"""data=webdataset (onestep/data/shards.py): brace-expanded shard patterns, an epoch that delivers every sample once
split over processes, corrupt samples and shards skipped and counted, precomputed latents used in place of the VAE,
and a training run that resumes after a crash with exactly the samples its checkpoint had not yet trained on."""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import Interrupt, compose, one_line
from onestep.data.shards import ShardStream, expand
from onestep.errors import ConfigError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _png(image: torch.Tensor) -> bytes:
    from PIL import Image

    u8 = ((image[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(u8, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, shards: int, per_shard: int, extra=None) -> list[str]:
    """Digits (16 px PNG) + "a handwritten <digit>" captions, keys s<shard>_<i>; ``extra(tar, shard)`` adds members."""
    from onestep.data.digits import load_digits_tensors

    images, labels = load_digits_tensors("train", 16)
    folder.mkdir(parents=True, exist_ok=True)
    keys = []
    for s in range(shards):
        with tarfile.open(folder / f"shard-{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                j = s * per_shard + i
                key = f"s{s}_{i:03d}"
                _add(tar, f"{key}.png", _png(images[j]))
                _add(tar, f"{key}.txt", f"a handwritten {DIGIT_WORDS[int(labels[j])]}".encode())
                keys.append(key)
            if extra:
                extra(tar, s)
    return keys


def _take(stream: ShardStream, n: int) -> list[str]:
    return [next(stream)[0] for _ in range(n)]


def test_patterns_expand_and_missing_shards_are_one_line(tmp_path):
    write_shards(tmp_path, 3, 2)
    both = expand(f"{tmp_path}/shard-{{00000..00001}}.tar::{tmp_path}/shard-00002.tar")
    assert [Path(p).name for p in both] == ["shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
    with pytest.raises(ConfigError) as e:
        expand(f"{tmp_path}/shard-{{00000..00004}}.tar")
    assert "2 of 5 shards do not exist (first: '" in one_line(e) and "shard-00003.tar" in one_line(e)
    with pytest.raises(ConfigError, match="data.path is not set"):
        expand(None)


def test_an_epoch_delivers_every_sample_once_split_over_processes(tmp_path):
    keys = write_shards(tmp_path, 4, 5)
    paths = expand(f"{tmp_path}/shard-{{00000..00003}}.tar")
    one = ShardStream(paths, seed=7)
    epoch0, epoch1 = _take(one, 20), _take(one, 20)
    assert sorted(epoch0) == sorted(keys) == sorted(epoch1) and epoch0 != epoch1  # reshuffled per epoch
    assert _take(ShardStream(paths, seed=7), 20) == epoch0 and _take(ShardStream(paths, seed=8), 20) != epoch0
    ranks = [ShardStream(paths, seed=7, rank=r, world=2) for r in range(2)]
    halves = [_take(r, 10) for r in ranks]
    assert sorted(halves[0] + halves[1]) == sorted(keys)  # disjoint shards, together the whole epoch
    with pytest.raises(ConfigError, match="4 shards cannot be split over 5 processes"):
        ShardStream(paths, seed=0, world=5)


def test_position_round_trips_and_refuses_another_layout(tmp_path):
    write_shards(tmp_path, 3, 4)
    paths = expand(f"{tmp_path}/shard-{{00000..00002}}.tar")
    a = ShardStream(paths, seed=1)
    _take(a, 7)
    b = ShardStream(paths, seed=1)
    b.load_state_dict(a.state_dict())
    assert _take(b, 11) == _take(a, 11)  # across the epoch boundary too
    with pytest.raises(ConfigError) as e:
        ShardStream(paths, seed=1, rank=0, world=2).load_state_dict(a.state_dict())
    assert "for 3 shards over 1 processes, this run has 3 over 2" in one_line(e)


def _corrupt(tar, shard):
    if shard == 0:
        _add(tar, "bad_image.png", b"not a png")
        _add(tar, "bad_image.txt", b"a handwritten one")
        _add(tar, "no_caption.png", _png(torch.zeros(1, 16, 16)))


@pytest.fixture(scope="module")
def t2i(tmp_path_factory):
    """The shipped text-to-image digits teacher's conditioner and codec (teacher=sd15 code)."""
    from onestep.experiment import load_teacher

    root = tmp_path_factory.mktemp("t2i")
    cfg = compose(["experiment=digits_t2i_lcm_lora", f"out_root={root}"])
    return load_teacher(cfg, root, progress=False)


def test_corrupt_samples_and_shards_are_skipped_and_counted(tmp_path, t2i):
    from onestep.data.shards import WebData

    keys = write_shards(tmp_path, 2, 3, extra=_corrupt)
    (tmp_path / "shard-00002.tar").write_bytes(b"\x00" * 100 + b"garbage")  # not a tar at all
    paths = expand(f"{tmp_path}/shard-{{00000..00002}}.tar")
    data = WebData(ShardStream(paths, seed=0), t2i.conditioner, t2i.codec, 16, t2i.teacher.data_shape)
    data.delivered = []
    b = data.batch(6, torch.device("cpu"))
    assert sorted(data.delivered) == sorted(keys) and b.real.shape == (6, *t2i.teacher.data_shape)
    assert data.stats() == {"data/skipped": 3.0}  # the broken PNG, the sample without caption, the broken shard
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.tar").write_bytes(b"garbage")
    empty = WebData(ShardStream([str(tmp_path / "empty" / "x.tar")], seed=0), t2i.conditioner, t2i.codec, 16,
                    t2i.teacher.data_shape)
    with pytest.raises(ConfigError) as e:
        empty.batch(1, torch.device("cpu"))
    assert "hold no readable sample" in one_line(e)


def test_precomputed_latents_replace_the_vae_and_images_equal_it(tmp_path, t2i):
    from safetensors.torch import save

    from onestep.data.digits import load_digits_tensors
    from onestep.data.shards import WebData

    images, _ = load_digits_tensors("train", 16)
    eight_bit = ((images[:4] + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1  # what the PNG members hold
    with torch.no_grad():
        want = t2i.codec.encode(eight_bit).float()
    write_shards(tmp_path / "img", 1, 4)
    with tarfile.open(tmp_path / "lat.tar", "w") as tar:
        for i in range(4):
            _add(tar, f"s0_{i:03d}.latent.safetensors", save({"latent": torch.full(want.shape[1:], float(i))}))
            _add(tar, f"s0_{i:03d}.txt", b"a handwritten one")
    for path, expected in ((tmp_path / "img" / "shard-00000.tar", want),
                           (tmp_path / "lat.tar", torch.arange(4.0).view(4, 1, 1, 1).expand_as(want))):
        data = WebData(ShardStream([str(path)], seed=0), t2i.conditioner, t2i.codec, 16, t2i.teacher.data_shape)
        data.delivered = []
        b = data.batch(4, torch.device("cpu"))
        order = [int(k.split("_")[1]) for k in data.delivered]
        assert torch.allclose(b.real, expected[order], atol=1e-5), path


@pytest.mark.slow
def test_training_resumes_after_a_crash_with_the_samples_not_yet_trained_on(tmp_path, monkeypatch):
    """digits_t2i_lcm_lora on 3 shards of 8: a run that crashes after its step-2 checkpoint (no save on the way
    out, as under kill -9) and is rerun reads, from step 2 on, exactly the samples an uninterrupted run reads; the
    samples of the first epoch are each trained on once. Every process's position is in the checkpoint."""
    from onestep.data.shards import WebData
    from onestep.train.trainer import train

    keys = write_shards(tmp_path / "shards", 3, 8)
    delivered: list[list[str]] = []
    batch = WebData.batch

    def recording(self, n, device):
        if self.delivered is None:
            self.delivered = []
            delivered.append(self.delivered)
        return batch(self, n, device)

    monkeypatch.setattr(WebData, "batch", recording)
    cfg = ["experiment=digits_t2i_lcm_lora", "data=webdataset",
           f"data.path='{tmp_path}/shards/shard-{{00000..00002}}.tar'",  # quoted: braces are Hydra syntax
           "trainer.steps=4",
           "trainer.batch_size=4", "trainer.checkpoint_every=2", "trainer.progress=false", "eval.num_samples=8",
           "eval.teacher_steps=[1]", "eval.student_steps=[1]", "eval.plot=false", f"out_root={tmp_path}"]
    train(compose(cfg), tmp_path / "whole")
    whole = delivered[-1][2:]  # the build's shape probe draws 2 and puts them back

    def crash(step, logs):
        if step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(compose(cfg), tmp_path / "crashed", callbacks=(crash,))
    first = delivered[-1][2:]
    train(compose(cfg), tmp_path / "crashed")
    rerun = delivered[-1][2:]
    per_step = 4  # one batch per step: consistency distillation has no critic
    assert first[: 3 * per_step] == whole[: 3 * per_step]
    assert first[: 2 * per_step] + rerun == whole  # the rerun starts at the checkpoint's position
    assert len(whole) == 16 and not [k for k, c in Counter(whole).items() if c > 1]  # within one 24-sample epoch
    assert set(whole) <= set(keys)
    state = torch.load(sorted((tmp_path / "whole" / "checkpoints").iterdir())[-1] / "state.pt", weights_only=True)
    position = state["data"][0]  # (epoch, shard, sample): 16 of the epoch's 24 samples read, 8 per shard
    assert position["epoch"] == 0 and 8 * position["shard"] + position["sample"] == 16, position


@pytest.mark.slow
@pytest.mark.xdist_group("distributed")
def test_two_processes_split_the_shards_and_each_resumes_its_own_position(tmp_path):
    """torchrun, 2 gloo processes, 4 shards of 6: each process reads its own 2 shards (12 samples an epoch), the
    checkpoint holds both positions (2 rows per step each), and a rerun with more steps continues from them to the
    end of the epoch; the run's stats count no skipped sample. Resumed on 4 processes, it stops with one line."""
    import json

    from test_distributed import launch

    write_shards(tmp_path / "shards", 4, 6)
    args = ["experiment=digits_t2i_lcm_lora", "data=webdataset",
            f"data.path='{tmp_path}/shards/shard-{{00000..00003}}.tar'", "trainer.batch_size=4",
            "trainer.checkpoint_every=2", "trainer.log_every=1", "trainer.progress=false", "eval.num_samples=8",
            "eval.teacher_steps=[1]", "eval.student_steps=[1]", "eval.plot=false", f"out_root={tmp_path}",
            f"run_dir={tmp_path / 'run'}"]

    def positions(step: int) -> list[tuple[int, int]]:
        state = torch.load(tmp_path / "run" / "checkpoints" / f"step_{step:08d}" / "state.pt", weights_only=True)
        return [(p["epoch"], 6 * p["shard"] + p["sample"]) for p in state["data"]]

    done = launch("torchrun", [*args, "trainer.steps=4"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert positions(4) == [(0, 8), (0, 8)]  # 4 steps x 2 rows on each process
    done = launch("torchrun", [*args, "trainer.steps=6"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from step 4" in done.stdout + done.stderr
    assert positions(6) == [(0, 12), (0, 12)]  # the rest of each process's epoch, nothing read twice
    stats = [json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()]
    assert [s["data/skipped"] for s in stats if "data/skipped" in s] == [0.0] * 6
    # the positions belong to a 2-process split of the shards: 4 processes are refused in one line
    done = launch("torchrun", [*args, "trainer.steps=8"], tmp_path, nproc=4)
    assert done.returncode != 0
    assert "onestep: error: data.path: the checkpoint's stream position is for 4 shards over 2 processes, this run " \
           "has 4 over 4" in done.stderr, done.stderr[-3000:]
    assert "IndexError" not in done.stderr, done.stderr[-3000:]  # (ranks 2, 3 have no position of their own)


# ---- onestep cache --------------------------------------------------------------------------------------------

def _digit_folder(folder: Path, n: int) -> list[tuple[str, str]]:
    """n digits as a.png + a.txt, plus one broken image with a caption and one image without (both skipped)."""
    from onestep.data.digits import load_digits_tensors

    images, labels = load_digits_tensors("train", 16)
    folder.mkdir(parents=True)
    out = []
    for i in range(n):
        (folder / f"d{i:02d}.png").write_bytes(_png(images[i]))
        caption = f"a handwritten {DIGIT_WORDS[int(labels[i])]}"
        (folder / f"d{i:02d}.txt").write_text(caption)
        out.append((f"d{i:02d}", caption))
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "broken.txt").write_text("a handwritten one")
    return out


def _cache_cfg(tmp_path, *extra):
    return compose(["experiment=digits_t2i_lcm_lora", f"out_root={tmp_path}", *extra])


def test_cache_writes_latent_and_embedding_shards_that_training_reads_without_encoders(tmp_path, t2i, monkeypatch):
    from safetensors.torch import load

    from onestep.data.shards import WebData
    from onestep.train.cache import cache

    samples = _digit_folder(tmp_path / "imgs", 9)
    cfg = _cache_cfg(tmp_path, "data=image_text", f"data.path={tmp_path / 'imgs'}")
    info = cache(cfg, tmp_path / "cached", shard_size=4, progress=False)
    assert (info["shards"], info["inputs"], info["written_now"], info["skipped_now"]) == (3, 10, 9, 1)
    assert info["pattern"] == f"{tmp_path / 'cached'}/{{00000..00002}}.tar"
    assert (tmp_path / "cached" / "cache.json").is_file()
    # the members equal the teacher's own encodings of the same PNG and caption
    with tarfile.open(tmp_path / "cached" / "00000.tar") as tar:
        names = tar.getnames()
        key = names[0].split(".")[0]
        latent = load(tar.extractfile(f"{key}.latent.safetensors").read())["latent"]
        emb = load(tar.extractfile(f"{key}.emb.safetensors").read())
        caption = tar.extractfile(f"{key}.txt").read().decode()
    assert len(names) == 9 and dict(samples)[key] == caption  # broken.png sorts first: 3 good of 4, 3 members each
    from onestep.data.text import _load_image

    with torch.no_grad():
        want = t2i.codec.encode(_load_image(tmp_path / "imgs" / f"{key}.png", 16).mean(0, keepdim=True)[None])[0]
        fields = t2i.conditioner.text.encode([caption])
    assert torch.allclose(latent, want, atol=1e-6)
    assert set(emb) == set(fields) and all(torch.equal(emb[k], fields[k][0]) for k in fields)
    # a rerun finds every shard done
    again = cache(cfg, tmp_path / "cached", shard_size=4, progress=False)
    assert again["written_now"] == 0 and again["shards"] == 3

    # training reads them with neither encoder (both made to fail), and the Cond equals the conditioner's own
    paths = expand(info["pattern"])
    data = WebData(ShardStream(paths, seed=0), t2i.conditioner, t2i.codec, 16, t2i.teacher.data_shape)
    data.delivered = []

    def no_encoder(*a, **k):
        raise AssertionError("an encoder ran")

    t2i.conditioner.text.null_fields(t2i.conditioner.negative_prompt)  # the negative prompt: encoded once a run

    with monkeypatch.context() as m:
        m.setattr(t2i.codec, "encode", no_encoder)
        m.setattr(t2i.conditioner.text, "encode", no_encoder)
        m.setattr(t2i.conditioner.cache, "dir", tmp_path / "empty_text_cache")  # the shards' fields, not the cache's
        b = data.batch(9, torch.device("cpu"))
    assert sorted(data.delivered) == sorted(k for k, _ in samples)
    texts = [dict(samples)[k] for k in data.delivered]
    t2i.conditioner.cache.ensure(texts)
    want = t2i.conditioner(texts)  # what the run would compute from the captions
    assert set(b.cond.fields) == set(want.fields) and all(torch.equal(b.cond.fields[k], want.fields[k])
                                                          for k in want.fields)


def test_cached_shards_of_another_teacher_are_refused_and_bad_input_is_one_line(tmp_path, t2i, monkeypatch):
    from onestep.data.shards import WebData
    from onestep.train.cache import cache

    _digit_folder(tmp_path / "imgs", 2)
    cfg = _cache_cfg(tmp_path, "data=image_text", f"data.path={tmp_path / 'imgs'}")
    info = cache(cfg, tmp_path / "cached", progress=False)
    data = WebData(ShardStream(expand(info["pattern"]), seed=0), t2i.conditioner, t2i.codec, 16,
                   t2i.teacher.data_shape)
    monkeypatch.setitem(t2i.codec.__dict__, "name", "another-vae")
    with pytest.raises(ConfigError) as e:
        data.batch(1, torch.device("cpu"))
    assert "cached with codec" in one_line(e) and "rerun onestep cache with this teacher" in one_line(e)
    for args, match in (([], "out is not set"), (["shard_size=0"], "shard_size=0 must be at least 1")):
        o = {"out": None if not args else tmp_path / "x", "shard_size": 0 if args else 1000}
        with pytest.raises(ConfigError, match=match):
            cache(cfg, o["out"], o["shard_size"], progress=False)
    with pytest.raises(ConfigError, match="onestep cache reads data=image_text, data=webdataset or data=prompts"):
        cache(_cache_cfg(tmp_path), tmp_path / "y", progress=False)  # data=digits_text: in memory already


def test_cache_of_a_prompt_file_fills_the_embedding_cache(tmp_path):
    from onestep.train.cache import cache

    prompts = tmp_path / "p.txt"
    prompts.write_text("a handwritten one\na handwritten two\n")
    info = cache(_cache_cfg(tmp_path, "data=prompts", f"data.path={prompts}"), None, progress=False)
    assert info["prompts"] == 2 and info["encoded_here"] == 2
    assert len(list(Path(info["cache"]).glob("*.safetensors"))) >= 2


@pytest.mark.slow
@pytest.mark.xdist_group("distributed")
def test_cache_over_two_processes_writes_every_shard_once(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from test_distributed import _free_port

    _digit_folder(tmp_path / "imgs", 10)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _free_port(),
           "-m", "onestep.cli", "cache", f"out={tmp_path / 'cached'}", "shard_size=3", "progress=false",
           "experiment=digits_t2i_lcm_lora", "data=image_text", f"data.path={tmp_path / 'imgs'}",
           f"out_root={tmp_path}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((tmp_path / "cached" / "cache.json").read_text())
    assert (info["shards"], info["written_now"], info["skipped_now"]) == (4, 10, 1), info
    keys = []
    for path in expand(info["pattern"]):
        with tarfile.open(path) as tar:
            keys += [n.split(".")[0] for n in tar.getnames() if n.endswith(".txt")]
    assert sorted(keys) == [f"d{i:02d}" for i in range(10)]
