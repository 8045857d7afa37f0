"""Moving digits: scikit-learn's 8x8 digits (native, not upsampled) drifting across a 16x16 canvas, captioned with
the digit and the direction ("a three moving left"): the data of the shipped text-to-video teacher
(``onestep/assets/moving_digits``, trained by tools/train_moving_digits.py).

A video is FRAMES = 9 frames (Wan's VAE takes 4k + 1 frames), (1, 9, 16, 16) in [-1, 1] with a -1 background.
The digit moves 1 px per frame along its direction, so it crosses the free 8 px of the canvas exactly once (from
one edge to the other); its offset across the direction of motion is drawn uniformly from 0..8. Captions are
templates filled with the digit's word or numeral and the direction: the teacher trains on ``TRAIN_TEMPLATES``,
``HELDOUT_TEMPLATES`` phrase it otherwise (prompt accuracy on them measures how the teacher generalizes).
``digit_of`` / ``direction_of`` read a prompt's digit and direction back for prompt accuracy. Every draw is
deterministic from its seed.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from onestep.data import digits_text
from onestep.data.digits_text import DIGIT_WORDS, digit_of
from onestep.errors import ConfigError

FRAMES = 9
CANVAS = 16
DIGIT = 8
#: the free span: the digit's corner moves over 0..TRAVEL, 1 px per frame
TRAVEL = CANVAS - DIGIT
DIRECTIONS = ("left", "right", "up", "down")
#: (rows, columns) moved per frame; rows grow downwards as in the image arrays
STEP = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
TRAIN_TEMPLATES = ["a {word} moving {dir}", "{num} moving {dir}", "the digit {word} moves {dir}",
                   "a handwritten {num} going {dir}", "{word} drifting {dir}", "a small {word} sliding {dir}",
                   "the number {num} travels {dir}"]
HELDOUT_TEMPLATES = ["a {word} that moves {dir}", "digit {num} heading {dir}", "a drawing of a {word} gliding {dir}",
                     "the {word} goes {dir}"]
SPLITS = {"train": TRAIN_TEMPLATES, "heldout": HELDOUT_TEMPLATES}
PROMPT_FILES = {"train": "prompts_train.txt", "heldout": "prompts_heldout.txt"}
_WORD = re.compile(r"[a-z]+|[0-9]")
#: every word a caption can hold (numerals excluded: single characters already)
WORDS = sorted(set(DIGIT_WORDS) | set(DIRECTIONS) | {w for t in TRAIN_TEMPLATES + HELDOUT_TEMPLATES
                                                     for w in _WORD.findall(t.format(word="", num="", dir=""))})


def caption(label: int, direction: str, template: str) -> str:
    if not 0 <= int(label) < len(DIGIT_WORDS):
        raise ConfigError(f"digit label {label} is not in 0..9")
    if direction not in DIRECTIONS:
        raise ConfigError(f"direction '{direction}' is unknown; use one of {DIRECTIONS}")
    return template.format(word=DIGIT_WORDS[int(label)], num=int(label), dir=direction)


def prompts(split: str) -> list[str]:
    """Every template of the split with every digit and direction, template-major, then direction, then digit."""
    if split not in SPLITS:
        raise ConfigError(f"caption split '{split}' is unknown; use one of {tuple(SPLITS)}")
    return [caption(d, r, t) for t in SPLITS[split] for r in DIRECTIONS for d in range(len(DIGIT_WORDS))]


def direction_of(prompt: str) -> int:
    """The index in DIRECTIONS of the one direction a prompt names ("a three moving left" -> 0)."""
    found = {DIRECTIONS.index(w) for w in _WORD.findall(prompt.lower()) if w in DIRECTIONS}
    if len(found) != 1:
        what = "no direction" if not found else f"several directions {sorted(DIRECTIONS[i] for i in found)}"
        raise ConfigError(f"prompt '{prompt}' names {what}; a moving-digits prompt names exactly one of {DIRECTIONS}")
    return found.pop()


def write_prompt_files(folder) -> list[Path]:
    """prompts_train.txt and prompts_heldout.txt in ``folder``, one prompt per line."""
    return digits_text.write_prompt_files(folder, PROMPT_FILES, prompts)


def render(digits: torch.Tensor, directions: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Videos (N, 1, FRAMES, CANVAS, CANVAS) in [-1, 1] of 8x8 ``digits`` (N, 1, 8, 8) moving along ``directions``
    (N,) (indices into DIRECTIONS), ``offsets`` (N,) px from the top / left edge across the motion."""
    n = digits.shape[0]
    step = torch.tensor([STEP[d] for d in DIRECTIONS])[directions]  # (N, 2)
    # a digit moving by -1 starts at the far edge, so every video crosses the whole free span
    start = torch.where(step < 0, TRAVEL, 0) + torch.where(step == 0, offsets[:, None], 0)
    out = torch.full((n, FRAMES, CANVAS, CANVAS), -1.0)
    span, rows_of = torch.arange(DIGIT), torch.arange(n)[:, None, None]
    for f in range(FRAMES):
        corner = start + f * step
        rows, cols = corner[:, :1] + span, corner[:, 1:] + span  # (N, 8) each
        out[rows_of, f, rows[:, :, None], cols[:, None, :]] = digits[:, 0]
    return out[:, None]


def draw(images: torch.Tensor, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` videos of digits drawn uniformly from ``images`` (N, 1, 8, 8), each with a uniform direction and
    offset: (videos, indices into ``images``, directions)."""
    idx = torch.randint(0, images.shape[0], (n,), generator=generator)
    directions = torch.randint(0, len(DIRECTIONS), (n,), generator=generator)
    offsets = torch.randint(0, TRAVEL + 1, (n,), generator=generator)
    return render(images[idx], directions, offsets), idx, directions


def moving_digits(split: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` videos of the digits split ``split`` ("train", "heldout", "all"): (videos, digit labels, directions);
    the same for the same seed."""
    from onestep.data.digits import load_digits_tensors

    images, labels = load_digits_tensors(split, DIGIT)
    videos, idx, directions = draw(images, n, torch.Generator().manual_seed(seed))
    return videos, labels[idx], directions


def captions_of(labels: torch.Tensor, directions: torch.Tensor, split: str = "train") -> list[list[str]]:
    """Every caption of ``split``'s templates for each (digit, direction)."""
    return [[caption(d, DIRECTIONS[r], t) for t in SPLITS[split]] for d, r in zip(labels.tolist(),
                                                                                   directions.tolist())]


#: data=moving_digits_text: how many training videos (of the train split's digits) the source holds, and their seed
TEXT_VIDEOS, TEXT_SEED = 4096, 0


@torch.no_grad()
def captioned_latents(codec, batch: int = 256) -> tuple[torch.Tensor, list[list[str]]]:
    """``data=moving_digits_text``: TEXT_VIDEOS videos of the train split's digits encoded by ``codec`` (the teacher's
    video VAE), each with every training-template caption of its digit and direction (the real videos that
    objectives reading data train on, as data=digits_text gives the captioned-digits teacher its images)."""
    videos, labels, directions = moving_digits("train", TEXT_VIDEOS, TEXT_SEED)
    latents = torch.cat([codec.encode(videos[i:i + batch].to(codec.device, codec.dtype)).float().cpu()
                         for i in range(0, len(videos), batch)])
    return latents, captions_of(labels, directions)
