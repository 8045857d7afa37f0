"""Evaluator for Gaussian-mixture experiments: exact metrics and a scatter plot over the true density."""

from __future__ import annotations

from pathlib import Path

import torch

from onestep.conditioning import labels_of
from onestep.denoisers.gmm import GaussianMixture
from onestep.eval.gmm_metrics import gmm_metrics


class GMMEvaluator:
    headline = "sliced_w2"

    def __init__(self, mixture: GaussianMixture):
        self.mixture = mixture
        # 2-D view: the identity for 2-D data, the top-2 principal axes of the mixture means otherwise
        if mixture.dim == 2:
            self.view = torch.eye(2, dtype=torch.float64)
        else:
            m = mixture.means - mixture.means.mean(0)
            self.view = torch.linalg.svd(m, full_matrices=False).Vh[:2].T

    def metrics(self, x, cond):
        return gmm_metrics(self.mixture, x, labels_of(cond))

    def plot(self, path: Path, panels):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ref = self.mixture.sample(20000, generator=torch.Generator().manual_seed(0)) @ self.view
        lim = float(ref.abs().max()) * 1.25
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
        for ax, (title, (x, _)) in zip(axes[0], panels.items()):
            ax.hist2d(ref[:, 0].numpy(), ref[:, 1].numpy(), bins=120, range=[[-lim, lim], [-lim, lim]],
                      cmap="Greys", density=True)
            p = (x.double().cpu() @ self.view)[:4000]
            ax.scatter(p[:, 0].numpy(), p[:, 1].numpy(), s=1.5, alpha=0.5, color="tab:red")
            ax.set_title(title, fontsize=9)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
