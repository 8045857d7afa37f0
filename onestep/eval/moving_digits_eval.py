"""Metrics of moving-digits videos (onestep.data.moving_digits), in the shipped digits feature space:

    fd                 per-frame Fréchet distance: every frame's 8x8 window around its intensity centroid, against
                       the frames of REFERENCE_VIDEOS real moving-digit videos cropped the same way (so real videos
                       score ~0); KID / precision / recall come with it
    digit_acc          share of videos whose every frame the shipped classifier assigns to the prompt's digit
    direction_acc      share of videos whose centroid path (last frame minus first) points the prompt's direction
                       and covers at least MIN_TRAVEL px (the real ones cover 8)
    prompt_acc         share of videos with both right (the conjunction)
    frame_digit_acc    share of frames of the prompt's digit
    temporal_consistency  share of videos whose frames all carry one class (whichever)

``video_metrics`` reads pixel videos; ``MovingDigitsEvaluator`` decodes a video teacher's latents with its codec
first and reads the prompts from the conditioning (``cond.texts``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from onestep.data.moving_digits import DIGIT, DIRECTIONS, TRAVEL, direction_of, moving_digits
from onestep.data.digits_text import digit_of
from onestep.rewards.digits_features import load_digits_features
from onestep.eval.fid import feature_metrics, stats_of

#: the reference: this many real videos of all 1,797 digits, drawn with this seed
REFERENCE_VIDEOS = 4000
REFERENCE_SEED = 0
FEATURE_BATCH = 4096
#: a frame with less ink than this (sum of (x + 1) / 2) has no centroid; its window is the canvas centre
MIN_INK = 1e-3
#: a centroid path shorter than this (px, along its main axis) has no direction: a still digit is not "moving"
MIN_TRAVEL = TRAVEL / 2


def centroids(videos: torch.Tensor) -> torch.Tensor:
    """(N, F, 2) intensity centroid (row, column) of every frame of videos (N, C, F, H, W) in [-1, 1]; ink is
    (x + 1) / 2 of the channel mean."""
    ink = ((videos.float().mean(1) + 1) / 2).clamp(min=0)  # (N, F, H, W)
    h, w = ink.shape[-2:]
    mass = ink.sum((-2, -1))
    rows = (ink.sum(-1) * torch.arange(h, dtype=ink.dtype)).sum(-1)
    cols = (ink.sum(-2) * torch.arange(w, dtype=ink.dtype)).sum(-1)
    c = torch.stack([rows, cols], -1) / mass.clamp(min=MIN_INK)[..., None]
    centre = torch.tensor([(h - 1) / 2, (w - 1) / 2], dtype=ink.dtype)
    return torch.where((mass > MIN_INK)[..., None], c, centre)


def crops(videos: torch.Tensor, cents: torch.Tensor | None = None) -> torch.Tensor:
    """(N * F, 1, 8, 8): each frame's DIGIT x DIGIT window centred on its intensity centroid, kept inside the canvas."""
    cents = centroids(videos) if cents is None else cents
    x = videos.float().mean(1)  # (N, F, H, W)
    n, f, h, w = x.shape
    # floor(x + 1/2), not round(): round-half-to-even would move a window 0 or 2 px for a digit moving 1 px
    corner = torch.floor(cents - (DIGIT - 1) / 2 + 0.5).long()
    corner[..., 0].clamp_(0, h - DIGIT)
    corner[..., 1].clamp_(0, w - DIGIT)
    span = torch.arange(DIGIT)
    rows = (corner[..., 0, None] + span).reshape(n * f, DIGIT, 1)
    cols = (corner[..., 1, None] + span).reshape(n * f, 1, DIGIT)
    return x.reshape(n * f, h, w)[torch.arange(n * f)[:, None, None], rows, cols][:, None]


def directions_of(cents: torch.Tensor) -> torch.Tensor:
    """(N,) index in DIRECTIONS of the dominant axis and sign of each centroid path (last frame minus first), -1
    where the path is shorter than MIN_TRAVEL."""
    d = cents[:, -1] - cents[:, 0]  # (N, 2): rows, columns
    horizontal = d[:, 1].abs() >= d[:, 0].abs()
    out = torch.where(horizontal, torch.where(d[:, 1] < 0, DIRECTIONS.index("left"), DIRECTIONS.index("right")),
                      torch.where(d[:, 0] < 0, DIRECTIONS.index("up"), DIRECTIONS.index("down")))
    return torch.where(d.abs().amax(1) >= MIN_TRAVEL, out, -1)


class MovingDigitsMetrics:
    """The metrics above for pixel videos (N, 1 or 3, F, 16, 16) in [-1, 1] and their prompts."""

    def __init__(self, reference_videos: int = REFERENCE_VIDEOS, pr_k: int = 3, kid_subsets: int = 50):
        self.net = load_digits_features()
        self.metric_args = {"pr_k": pr_k, "kid_subsets": kid_subsets, "kid_subset_size": 1000}
        real, _, _ = moving_digits("all", reference_videos, REFERENCE_SEED)
        self.ref = stats_of(self._features(crops(real))[0])

    @torch.no_grad()
    def _features(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = torch.cat([self.net.features(frames[i:i + FEATURE_BATCH]) for i in range(0, len(frames),
                                                                                            FEATURE_BATCH)])
        return feats, self.net.head(feats)

    def __call__(self, videos: torch.Tensor, prompts: list[str]) -> dict:
        if len(prompts) != videos.shape[0]:
            raise ValueError(f"{videos.shape[0]} videos need as many prompts, got {len(prompts)}")
        cents = centroids(videos)
        feats, logits = self._features(crops(videos, cents))
        classes = logits.argmax(1).view(videos.shape[0], -1)  # (N, F)
        digit = torch.tensor([digit_of(p) for p in prompts])
        direction = torch.tensor([direction_of(p) for p in prompts])
        digit_ok = (classes == digit[:, None]).all(1)
        direction_ok = directions_of(cents) == direction
        mean = lambda b: float(b.double().mean())  # noqa: E731
        return {**feature_metrics(feats, self.ref, **self.metric_args),
                "digit_acc": mean(digit_ok), "direction_acc": mean(direction_ok),
                "prompt_acc": mean(digit_ok & direction_ok), "frame_digit_acc": mean(classes == digit[:, None]),
                "temporal_consistency": mean((classes == classes[:, :1]).all(1))}


class MovingDigitsEvaluator:
    """``eval.features=moving_digits`` with a video teacher: latents decoded by the teacher's codec (videos
    (B, C, F, H, W) in [-1, 1]), then MovingDigitsMetrics against the prompts of the conditioning."""

    headline = "fd"
    what = (f"per-frame FD in the shipped digits feature space (8x8 windows at each frame's intensity centroid) "
            f"against the frames of {REFERENCE_VIDEOS} real moving-digit videos cropped the same way; prompt acc = "
            "every frame of the prompt's digit and the centroid path in the prompt's direction; temporal "
            "consistency = share of videos whose frames all carry one class")
    DECODE_BATCH = 256

    def __init__(self, codec):
        from onestep.eval.video_eval import TextVideoEvaluator

        self.codec, self.inner, self.panels = codec, MovingDigitsMetrics(), TextVideoEvaluator(codec)

    @torch.no_grad()
    def videos(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.codec.decode(latents[i:i + self.DECODE_BATCH].to(self.codec.device, self.codec.dtype))
                          .float().cpu() for i in range(0, latents.shape[0], self.DECODE_BATCH)])

    def metrics(self, x, cond):
        return self.inner(self.videos(x), list(cond.texts))

    def plot(self, path: Path, panels):
        """The video panels of every text-to-video run: a PNG strip of frames and an animated GIF next to it."""
        self.panels.plot(path, panels)
