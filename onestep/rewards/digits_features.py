"""The digits feature network: a small CNN classifier trained on the digits train split
(tools/train_digits_features.py), shipped in ``onestep/assets/digits_features``. Its penultimate layer gives an
offline Fréchet distance ("FD"; like FID, Heusel et al. 2017, but in this network's feature space, so it is *not*
comparable to Inception FID) and k-NN precision/recall; its logits give class metrics of class-conditional samples:

    class coverage   fraction of the classes the classifier finds in at least half their fair share
                     (1 / (2 num_classes)) of the samples
    label accuracy   fraction of samples the classifier assigns to the label they were generated for
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from onestep.errors import ConfigError

#: the digit words and how a prompt names its digit (the captioned-digits prompts; onestep.data.digits_text)
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
#: CLIP's pre-tokenizer splits letters into words and numbers into single digits; so does digit_of
TOKEN = re.compile(r"[a-z]+|[0-9]")


def digit_of(prompt: str) -> int:
    """The one digit a prompt names, by word or numeral ("a handwritten seven", "the digit 7" -> 7)."""
    found = {DIGIT_WORDS.index(w) if w in DIGIT_WORDS else int(w)
             for w in TOKEN.findall(prompt.lower()) if w in DIGIT_WORDS or w.isdigit()}
    if len(found) != 1:
        what = "no digit" if not found else f"several digits {sorted(found)}"
        raise ConfigError(f"prompt '{prompt}' names {what}; a digits prompt names exactly one digit, as a word "
                          "(zero..nine) or a numeral (0..9)")
    return found.pop()


ASSET = Path(__file__).resolve().parent.parent / "assets" / "digits_features"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class DigitsFeatureNet(nn.Module):
    """conv-conv-pool-conv-pool, a hidden layer (the features), a linear classifier. Input (N, 1, H, W) in [-1, 1]."""

    def __init__(self, width: int = 32, feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        self.arch = {"width": width, "feature_dim": feature_dim, "num_classes": num_classes}
        self.trunk = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
            nn.Flatten(), nn.Linear(8 * width, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, feature_dim)."""
        return self.trunk(x.to(self.head.weight.dtype))  # float32 as shipped; float64 after .double()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def forward(self, x):
        return self.logits(x)


def load_digits_features(folder: str | Path | None = None) -> DigitsFeatureNet:
    """The shipped network (or the one in ``folder``), in eval mode; a missing or corrupt asset is a one-line
    ConfigError."""
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else ASSET
    fix = "reinstall onestep or run tools/train_digits_features.py"
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise ConfigError(f"digits feature network '{folder}' has no {name}; {fix}")
    try:
        meta = json.loads((folder / CONFIG_FILE).read_text())
        net = DigitsFeatureNet(**meta["arch"])
        net.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    except Exception as e:  # noqa: BLE001 - json, safetensors and torch each raise their own types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"digits feature network '{folder}' is corrupt ({type(e).__name__}: {first[:200]}); "
                          f"{fix}") from None
    return net.eval().requires_grad_(False)


def class_metrics(logits: torch.Tensor, cond: torch.Tensor | None, num_classes: int) -> dict:
    """Class coverage (and label accuracy when the samples were generated for labels ``cond``)."""
    pred = logits.argmax(1)
    share = torch.bincount(pred, minlength=num_classes).double() / pred.numel()
    out = {"class_coverage": float((share >= 0.5 / num_classes).double().mean())}
    if cond is not None:
        out["label_acc"] = float((pred == cond.to(pred.device)).double().mean())
    return out
