"""Train the shipped digits teacher: a class-conditional diffusers UNet2DModel on the digits train split.

    python tools/train_digits_teacher.py [--out FOLDER] [--steps 2500] [--threads 1]
    python tools/train_digits_teacher.py --eval-only      # re-measure the quality of an existing folder

v-prediction under the cosine VP schedule (Nichol & Dhariwal 2021; v = alpha eps - sigma x0, Salimans & Ho
2022), plain v-MSE with t ~ U[t_min, t_max], labels dropped with probability 0.1 (the "no label" token
num_classes) so classifier-free guidance works, AdamW with warmup + cosine decay, EMA of the weights (the
EMA is what ships). The folder is diffusers' save_pretrained layout plus onestep.json: the adapter settings,
this training config and the measured quality (FD in the digits feature space at 1 and 32 DDIM steps).
Deterministic for a given seed and thread count.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from onestep.data.digits import NUM_CLASSES, DigitsData
from onestep.denoisers.diffusers import ADAPTER_FILE, UNet2DDenoiser, load_unet_denoiser, save_unet_denoiser
from onestep.core import dsm_loss
from onestep.schedules import make_schedule

ASSET = Path(__file__).resolve().parent.parent / "onestep" / "assets" / "digits_teacher"
UNET = {"sample_size": 8, "in_channels": 1, "out_channels": 1, "block_out_channels": [32, 64],
        "layers_per_block": 1, "down_block_types": ["DownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "UpBlock2D"], "norm_num_groups": 8, "attention_head_dim": 8,
        "num_class_embeds": NUM_CLASSES + 1}
TRAIN = {"schedule": "vp_cosine", "prediction": "v", "steps": 2500, "batch": 128, "lr": 1e-3, "warmup": 100,
         "weight_decay": 0.0, "ema_decay": 0.999, "label_dropout": 0.1, "grad_clip": 1.0, "seed": 0}
QUALITY_SAMPLES = 2000
QUALITY_SEED = 12345


def train(out: Path, steps: int) -> dict:
    from diffusers import UNet2DModel

    cfg = TRAIN | {"steps": steps}
    torch.manual_seed(cfg["seed"])
    data = DigitsData("train", UNET["sample_size"])
    net = UNet2DDenoiser(UNet2DModel(**UNET), make_schedule(cfg["schedule"]), cfg["prediction"])
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    lr_at = lambda i: min(1.0, (i + 1) / cfg["warmup"]) * 0.5 * (1 + math.cos(math.pi * i / steps))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    t0 = time.perf_counter()
    for i in range(steps):
        x0, y = data.clean(cfg["batch"])
        drop = torch.rand(y.shape[0]) < cfg["label_dropout"]
        y = torch.where(drop, torch.full_like(y, NUM_CLASSES), y)
        loss = dsm_loss(net, x0, y, weighting=cfg["prediction"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), cfg["grad_clip"])
        opt.step()
        sched.step()
        decay = min(cfg["ema_decay"], (1 + i) / (10 + i))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), net.parameters()):
                pe.lerp_(p, 1 - decay)
        if (i + 1) % 100 == 0:
            print(f"step {i + 1}/{steps}: v-loss {loss.item():.4f}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    info = {"unet": UNET, "training": cfg, "train_seconds": round(time.perf_counter() - t0, 1),
            "tool": "tools/train_digits_teacher.py"}
    save_unet_denoiser(ema, out, info)
    return info


@torch.no_grad()
def quality(folder: Path) -> dict:
    """FD (digits features, vs all 1,797 real images) and label accuracy of DDIM samples at 1 and 32 steps."""
    from onestep.data.digits import load_digits_tensors
    from onestep.rewards.digits_features import class_metrics, load_digits_features
    from onestep.eval.frechet import frechet_distance_feats
    from onestep.sampling import sample

    teacher = load_unet_denoiser(folder, "digits teacher")
    feats = load_digits_features()
    real, _ = load_digits_tensors("all", UNET["sample_size"])
    g = torch.Generator().manual_seed(QUALITY_SEED)
    noise = torch.randn(QUALITY_SAMPLES, *teacher.data_shape, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (QUALITY_SAMPLES,), generator=g)
    out = {"samples": QUALITY_SAMPLES, "reference": "all 1797 digits", "sampler": "ddim"}
    for steps in (1, 32):
        x = sample(teacher, noise, teacher.schedule.default_ts(steps), labels, method="ddim")
        fd = frechet_distance_feats(feats.features(x), feats.features(real))
        out[f"{steps}_step"] = {"fd": round(fd, 4), **class_metrics(feats.logits(x), labels, NUM_CLASSES)}
        print(f"teacher {steps} step(s): {out[f'{steps}_step']}", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ASSET))
    p.add_argument("--steps", type=int, default=TRAIN["steps"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-only", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    if not a.eval_only:
        train(out, a.steps)
    meta = json.loads((out / ADAPTER_FILE).read_text())
    meta["quality"] = quality(out)
    (out / ADAPTER_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
