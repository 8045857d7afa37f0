"""Evaluator of text-to-video runs (protocol "text_videos"): samples are latents, decoded by the teacher's video VAE
only here. It computes no metric unless one is configured, and none is yet: a run is judged by its sample panels
(samples.png, a strip of frames, and samples.gif, the animated grid) and its losses; ``what`` says so in results.md.
"""

from __future__ import annotations

from pathlib import Path

import torch

from onestep.data.video import video_grid, write_gif
from onestep.eval.t2i_eval import decoded, save_panels

DECODE_BATCH = 4
#: videos per panel row and frames per video in the PNG strip
PANEL_VIDEOS = 4
STRIP_FRAMES = 8


class TextVideoEvaluator:
    headline = "none"
    what = "no video metric is configured for this teacher; judge this run by samples.png / samples.gif and stats.jsonl"

    def __init__(self, codec):
        self.codec = codec

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> videos (n, C, F, H, W) in [-1, 1] on the CPU."""
        return decoded(self.codec, latents, DECODE_BATCH)

    def metrics(self, x: torch.Tensor, cond) -> dict:
        return {}

    def plot(self, path: Path, panels) -> None:
        """``path`` (PNG): per panel, the first videos' frames left to right (every k-th frame, at most
        STRIP_FRAMES), one video per line; next to it ``path`` with suffix .gif: the panels' videos animated, one
        panel per row of the grid (same noise and prompts in every row)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        videos = {title: self.decode(x[:PANEL_VIDEOS]) for title, (x, _) in panels.items()}
        n = min(v.shape[0] for v in videos.values())
        frames = next(iter(videos.values())).shape[2]
        keep = list(range(0, frames, -(-frames // STRIP_FRAMES)))
        fig, axes = plt.subplots(len(videos), 1, figsize=(1.3 * len(keep) + 1.5, 1.3 * n * len(videos) + 0.6),
                                 squeeze=False)
        for ax, (title, v) in zip(axes[:, 0], videos.items()):
            # one grid "frame" whose rows are videos and columns their frames
            strip = video_grid(v[:n, :, keep].transpose(1, 2).unsqueeze(2).flatten(0, 1), nrow=len(keep))[0]
            ax.imshow(strip.numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_ylabel(title, rotation=0, ha="right", va="center", fontsize=9)
        save_panels(fig, panels, n, path)
        write_gif(Path(path).with_suffix(".gif"), video_grid(torch.cat([v[:n] for v in videos.values()]), nrow=n))
