"""Captions for scikit-learn's digits: the prompts of the shipped text-to-image digits teacher
(``onestep/assets/digits_t2i``, trained by tools/train_digits_t2i.py).

A caption is a template filled with a digit's word ("seven") and / or numeral ("7"). The teacher is trained on
``TRAIN_TEMPLATES`` only; ``HELDOUT_TEMPLATES`` use other phrasings (and words the text encoder never saw), so
prompt accuracy on them measures how the teacher generalizes to new prompts. ``digit_of`` reads the digit a
prompt names back, which is what prompt accuracy compares the feature network's classification against.
"""

from __future__ import annotations

from pathlib import Path

import torch

from onestep.errors import ConfigError
from onestep.rewards.digits_features import DIGIT_WORDS, TOKEN, digit_of  # noqa: F401  (digit_of: re-exported)

#: the digit appears at varied token positions (1 to 7), so the text encoder does not tie it to one place
TRAIN_TEMPLATES = ["{word}", "{num}", "number {word}", "a handwritten {word}", "the digit {num}", "a thin {word}",
                   "a bold {num}", "a picture of a {word}", "a picture of the handwritten number {num}"]
HELDOUT_TEMPLATES = ["an image of the number {word}", "digit {num} written by hand", "a drawing of a {word}",
                     "handwritten {num}"]
SPLITS = {"train": TRAIN_TEMPLATES, "heldout": HELDOUT_TEMPLATES}
PROMPT_FILES = {"train": "prompts_train.txt", "heldout": "prompts_heldout.txt"}
_WORD = TOKEN
#: every word a caption can hold (numerals excluded: they are single characters already)
WORDS = sorted(set(DIGIT_WORDS) | {w for t in TRAIN_TEMPLATES + HELDOUT_TEMPLATES
                                   for w in _WORD.findall(t.format(word="", num=""))})


def caption(label: int, template: str) -> str:
    if not 0 <= int(label) < len(DIGIT_WORDS):
        raise ConfigError(f"digit label {label} is not in 0..9")
    return template.format(word=DIGIT_WORDS[int(label)], num=int(label))


def prompts(split: str) -> list[str]:
    """Every template of the split with every digit, template-major."""
    if split not in SPLITS:
        raise ConfigError(f"caption split '{split}' is unknown; use one of {tuple(SPLITS)}")
    return [caption(d, t) for t in SPLITS[split] for d in range(len(DIGIT_WORDS))]


def write_prompt_files(folder, files: dict[str, str] | None = None, prompts_of=None) -> list[Path]:
    """prompts_train.txt and prompts_heldout.txt in ``folder``, one prompt per line: each split's file name in
    ``files`` (default PROMPT_FILES) and its prompts from ``prompts_of(split)`` (default ``prompts``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, name in (files or PROMPT_FILES).items():
        path = folder / name
        path.write_text("".join(p + "\n" for p in (prompts_of or prompts)(split)), encoding="utf-8")
        paths.append(path)
    return paths


@torch.no_grad()
def captioned_latents(codec, size: int, split: str = "train", batch: int = 256) -> tuple[torch.Tensor, list[list[str]]]:
    """``data=digits_text``: the digits of ``split`` upsampled to ``size`` (as the teacher was trained) and encoded
    by ``codec`` (the teacher's VAE), each with every training-template caption of its digit."""
    from onestep.data.digits import load_digits_tensors

    images, labels = load_digits_tensors(split, size)
    latents = torch.cat([codec.encode(images[i:i + batch].to(codec.device, codec.dtype)).float().cpu()
                         for i in range(0, len(images), batch)])
    return latents, [[caption(d, t) for t in TRAIN_TEMPLATES] for d in labels.tolist()]
