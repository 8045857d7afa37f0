"""Train the digits feature network (onestep/rewards/digits_features.py) and ship it in onestep/assets/digits_features.

    python tools/train_digits_features.py [--out FOLDER] [--size 8] [--threads 2]

Adam on the digits train split with ±1-pixel random shifts (so that samples a pixel off still map to their
class); writes model.safetensors and config.json (architecture, training settings, held-out accuracy).
Deterministic for a given seed and thread count.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from onestep.data.digits import load_digits_tensors
from onestep.rewards.digits_features import ASSET, CONFIG_FILE, WEIGHTS_FILE, DigitsFeatureNet

TRAIN = {"epochs": 40, "batch": 64, "lr": 2e-3, "weight_decay": 1e-4, "shift": 1, "seed": 0}


def shift(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """Translate each image by up to k pixels in x and y, filling with background (-1)."""
    n, _, h, w = x.shape
    pad = torch.nn.functional.pad(x, (k, k, k, k), value=-1.0)
    dy, dx = torch.randint(0, 2 * k + 1, (2, n), generator=g)
    return torch.stack([pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])


@torch.no_grad()
def accuracy(net, x, y) -> float:
    return float((net.logits(x).argmax(1) == y).double().mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ASSET))
    p.add_argument("--size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(TRAIN["seed"])
    g = torch.Generator().manual_seed(TRAIN["seed"])
    xtr, ytr = load_digits_tensors("train", a.size)
    xte, yte = load_digits_tensors("heldout", a.size)
    net = DigitsFeatureNet()
    opt = torch.optim.AdamW(net.parameters(), lr=TRAIN["lr"], weight_decay=TRAIN["weight_decay"])
    steps = TRAIN["epochs"] * -(-xtr.shape[0] // TRAIN["batch"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, TRAIN["lr"], total_steps=steps)
    t0 = time.perf_counter()
    for epoch in range(TRAIN["epochs"]):
        net.train()
        perm = torch.randperm(xtr.shape[0], generator=g)
        for i in range(0, perm.numel(), TRAIN["batch"]):
            idx = perm[i:i + TRAIN["batch"]]
            loss = torch.nn.functional.cross_entropy(net.logits(shift(xtr[idx], TRAIN["shift"], g)), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        net.eval()
        if (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1}: loss {loss.item():.4f}  held-out accuracy {accuracy(net, xte, yte):.4f}")
    acc = accuracy(net, xte, yte)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / WEIGHTS_FILE))
    meta = {"arch": net.arch, "image_size": a.size, "heldout_accuracy": acc, "train_accuracy": accuracy(net, xtr, ytr),
            "train_images": int(xtr.shape[0]), "heldout_images": int(xte.shape[0]), "training": TRAIN,
            "seconds": round(time.perf_counter() - t0, 1), "tool": "tools/train_digits_features.py"}
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    print(f"held-out accuracy {acc:.4f} ({xte.shape[0]} images); wrote {out}")


if __name__ == "__main__":
    main()
