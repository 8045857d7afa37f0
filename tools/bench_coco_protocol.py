"""Wall time of the coco2014 protocol's stages on CPU, per 1,000 samples, at a small size with tiny stand-in networks:
what the protocol itself costs (PIL crops and resizes, clean-fid's resize, feature batching, the Fréchet distance)
before the real networks are added, to help plan a COCO-30k evaluation.

    OMP_NUM_THREADS=1 python tools/bench_coco_protocol.py      # measure; writes results/coco_protocol_cpu.{json,md}
    python tools/bench_coco_protocol.py render                 # rewrite the .md from its JSON, running nothing

Stand-ins: the shipped text-to-image digits teacher (an SD1.5-shaped pipeline, 16 px images) generates, one DDIM step;
a TorchScript module saved under clean-fid's Inception file name (pooling + a linear map to 2048-D) replaces the
Inception weights; a one-layer open_clip model replaces ViT-g-14. Real images are COCO-sized (640x480) PNGs.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
NAME = "coco_protocol_cpu"
COMMAND = "OMP_NUM_THREADS=1 python tools/bench_coco_protocol.py"
TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 16, "patch_size": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


class StandInInception(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(12, 2048))

    def forward(self, x, return_features: bool = False):
        return self.layers(x)


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def measure(n: int, work: Path) -> dict:
    import open_clip
    from PIL import Image

    from onestep import experiment
    from onestep.eval import coco
    from onestep.eval.clip_score import ClipScorer
    from onestep.eval.evaluators import evaluated
    from onestep.eval.frechet import frechet_distance, gaussian_stats
    from onestep.eval.report import eval_inputs
    from onestep.sampling import sample

    g = np.random.default_rng(0)
    real = work / "val2014"
    real.mkdir()
    ramp = np.linspace(0, 255, 640)[None, :, None] * np.linspace(0.2, 1, 480)[:, None, None]
    for i in range(n):
        Image.fromarray(np.clip(ramp + g.normal(0, 30, (480, 640, 3)), 0, 255).astype(np.uint8)).save(real / f"{i}.png")
    (work / "captions.txt").write_text("\n".join(f"a handwritten digit {i % 10}" for i in range(n)) + "\n")
    torch.jit.script(StandInInception()).save(str(work / "inception-2015-12-05.pt"))
    (work / "tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(work / "tiny-clip.json")
    torch.manual_seed(0)
    torch.save(open_clip.create_model("tiny-clip", pretrained=None).state_dict(), work / "tiny-clip.pt")

    from hydra import compose, initialize_config_module

    import onestep.config  # noqa: F401  (registers the schemas)
    import onestep.objectives  # noqa: F401
    with initialize_config_module("onestep.configs", version_base="1.3"):
        cfg = compose("config", overrides=[
            "experiment=digits_t2i_dmd2", "eval.protocol=coco2014", f"eval.captions={work / 'captions.txt'}",
            f"eval.reference={real}", f"eval.inception_path={work}", f"out_root={work}", f"eval.num_samples={n}"])
    setup = evaluated(cfg, experiment.build(cfg, work / "run", progress=False))
    ev = setup.evaluator
    seconds = {}
    _, seconds["reference statistics at 256 px (640x480 PNGs: read, crop, LANCZOS, clean-fid resize, features)"] = \
        _timed(lambda: coco.reference_stats(real, ev.features, lambda a: coco.crop_resize(a, 256), "bench-256", None,
                                            progress=False))
    _, seconds["patch reference statistics (299-px crops of the same PNGs)"] = _timed(
        lambda: coco.reference_stats(real, ev.features, coco.patch_crop, "bench-patch", None, progress=False))
    noise, cond = eval_inputs(setup, n, seed=0)
    teacher = setup.teacher
    x, seconds["generation: the stand-in teacher, 1 DDIM step"] = _timed(
        lambda: torch.cat([sample(teacher, noise[i:i + 16], teacher.schedule.default_ts(1), cond[i:i + 16])
                           for i in range(0, n, 16)]))
    u8, seconds["VAE decode + uint8 quantization"] = _timed(lambda: np.concatenate(
        [coco.quantize(ev.decode(x[i:i + 16])) for i in range(0, n, 16)]))
    feats, seconds["generated features at 256 px (crop, LANCZOS, clean-fid resize, features)"] = _timed(
        lambda: ev.features.of_arrays(u8, lambda a: coco.crop_resize(a, 256)))
    scorer = ClipScorer(str(work / "tiny-clip.json"), work / "tiny-clip.pt", prefix="A photo depicts ")
    images = [Image.fromarray(coco.crop_resize(a, 256)) for a in u8]
    _, seconds["CLIP score (CLIP's PIL preprocessing, one-layer model)"] = _timed(
        lambda: torch.cat([scorer.cosines(images[i:i + 16], cond.texts[i:i + 16]) for i in range(0, n, 16)]))
    mu, sigma = gaussian_stats(torch.from_numpy(feats))
    _, fd_seconds = _timed(lambda: frechet_distance(mu, sigma, mu, sigma))
    return {"samples": n, "threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "cpu": platform.processor() or platform.machine(),
            "per_1000_s": {k: round(v * 1000 / n, 2) for k, v in seconds.items()},
            "frechet_2048_s": round(fd_seconds, 2)}


def render(d: dict) -> str:
    lines = [f"coco2014 protocol stages on CPU. Command: `{COMMAND}` ({d['samples']} samples, scaled to 1,000; {d['threads']} torch thread(s), "
             f"OMP_NUM_THREADS={d['omp_num_threads']}, {d['cpu']}, a machine shared with other jobs: times are "
             "indicative).", "",
             "Stand-ins: the shipped 16-px text-to-image digits teacher generates; a pooled linear map saved as "
             "clean-fid's Inception file and a one-layer open_clip model replace Inception-v3 and ViT-g-14. So the "
             "rows are the protocol's own cost (PIL crops, LANCZOS and clean-fid resizes, batching); the real "
             "Inception, ViT-g-14, generator and VAE come on top and belong on a GPU.", "",
             "| stage | s per 1,000 samples |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in d["per_1000_s"].items()]
    lines += ["", f"Once per evaluation: the 2048-D Fréchet distance, {d['frechet_2048_s']:.2f} s."]
    return "\n".join(lines) + "\n"


def rendered(folder: Path) -> dict[str, str]:
    """The markdown this tool writes, rendered from ``folder``'s coco_protocol_cpu.json alone."""
    return {f"{NAME}.md": render(json.loads((folder / f"{NAME}.json").read_text()))}


def main(argv: list[str]) -> None:
    out = ROOT / "results"
    if argv != ["render"]:
        with tempfile.TemporaryDirectory() as tmp:
            data = measure(int(argv[0]) if argv else 200, Path(tmp))
        (out / f"{NAME}.json").write_text(json.dumps(data, indent=1) + "\n")
    text = rendered(out)[f"{NAME}.md"]
    (out / f"{NAME}.md").write_text(text)
    sys.path.insert(0, str(ROOT / "tools"))
    from readme_block import update_readme

    update_readme(f"results/{NAME}.md")
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
