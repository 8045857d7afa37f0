"""Student vs teacher at several step counts: same noise, same labels, same sample count, same metric."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from onestep.progress import bar as progress_bar

from onestep.sampling import hybrid_sample, nfe, sample

CHUNK = 2048


def chunked(fn: Callable, noise: torch.Tensor, cond: torch.Tensor | None, chunk: int = CHUNK,
            progress: bool = True) -> torch.Tensor:
    """``fn(noise, cond)`` chunk by chunk on the CPU; a progress bar (with ETA) when there is more than one chunk."""
    outs = []
    starts = range(0, noise.shape[0], chunk)
    for i in progress_bar(starts, desc="sample", disable=not progress or len(starts) < 2, leave=False):
        outs.append(fn(noise[i:i + chunk], None if cond is None else cond[i:i + chunk]).cpu())
    return torch.cat(outs)


def eval_inputs(setup, n: int, seed: int):
    """Fixed evaluation noise and conditioning (independent of the training RNG stream), drawn from the
    experiment's evaluation data (e.g. held-out prompts) when it has one, else from its training data."""
    data = getattr(setup, "eval_data", None) or setup.data
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        b = data.batch(n, torch.device("cpu"))
    return b.noise, b.cond


def compare(setup, student, generator, teacher, eval_cfg, *, seed: int = 12345, progress: bool = True):
    """Rows of metrics for the student at eval_cfg.student_steps and the teacher at eval_cfg.teacher_steps.

    Returns (rows, samples) where samples maps a panel title to (x, cond) for plotting.
    """
    noise, cond = eval_inputs(setup, eval_cfg.num_samples, seed)
    device = next(generator.parameters()).device
    jobs = [("student", "renoise" if student.method == "renoise" else student.method, k) for k in eval_cfg.student_steps]
    jobs += [("hybrid", eval_cfg.teacher_method, k) for k in getattr(eval_cfg, "hybrid_teacher_steps", None) or []]
    jobs += [("teacher", eval_cfg.teacher_method, k) for k in eval_cfg.teacher_steps]
    rows, samples = [], {}
    for model, method, steps in progress_bar(jobs, desc="evaluate", disable=not progress, leave=False):
        rng = torch.Generator(device=device).manual_seed(seed)
        if model == "student":
            fn = lambda z, c: student.sample(generator, z.to(device), _dev(c, device), steps, rng)  # noqa: E731
        elif model == "hybrid":  # ``steps`` is the teacher's share of the student's own t-list
            fn = lambda z, c: hybrid_sample(teacher, generator, z.to(device), student.ts, steps,  # noqa: E731
                                            _dev(c, device), teacher_method=method, student_method=student.method,
                                            generator=rng)
        else:
            ts = teacher.schedule.default_ts(steps)
            fn = lambda z, c: sample(teacher, z.to(device), ts, _dev(c, device), method=method, generator=rng)  # noqa: E731
        x = chunked(fn, noise, cond, chunk=getattr(setup.evaluator, "sample_chunk", CHUNK), progress=progress)
        m = setup.evaluator.metrics(x, cond)
        if model == "hybrid":
            row = {"model": f"teacher {steps} + student", "sampler": f"{method} + {student.method}",
                   "steps": len(student.ts), "nfe": len(student.ts)}
        else:
            row = {"model": model, "sampler": method, "steps": steps, "nfe": nfe(method, steps)}
        rows.append({**row, **{k: v for k, v in m.items() if not isinstance(v, list)}})
        samples[f"{row['model']} {row['steps']} step{'s' if row['steps'] > 1 else ''}"] = (x, cond)
    return rows, samples


def _dev(c, device):
    return None if c is None else c.to(device)


#: clip_score is 100 cos (CLIPScore) or the coco2014 protocols' raw cosine (0.3041): 4 significant digits fit both
COLUMNS = [("model", "model", "{}"), ("sampler", "sampler", "{}"), ("steps", "steps", "{}"), ("nfe", "NFE", "{}"),
           ("sliced_w2", "sliced-W2", "{:.4f}"), ("modes_covered", "modes", "{}"),
           ("worst_mode_mass_err", "worst mode mass err", "{:.1%}"), ("mean_err", "mean err", "{:.4f}"),
           ("cov_err", "cov err", "{:.4f}"), ("fd", "FD", "{:.3f}"), ("patch_fd", "patch FID", "{:.3f}"),
           ("kid", "KID", "{:.4f}"), ("precision", "precision", "{:.3f}"), ("recall", "recall", "{:.3f}"),
           ("clip_score", "CLIP score", "{:.4g}"), ("imagereward", "ImageReward", "{:.3f}"),
           ("hpsv2", "HPSv2", "{:.4f}"), ("reward", "reward", "{:.4f}"), ("diversity", "diversity", "{:.4f}"),
           ("class_coverage", "class coverage", "{:.0%}"),
           ("label_acc", "label acc", "{:.1%}"), ("prompt_acc", "prompt acc", "{:.1%}"),
           ("temporal_consistency", "temporal consistency", "{:.1%}")]


def markdown_table(rows: list[dict]) -> str:
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key, "")
            if key == "modes_covered" and "num_modes" in r:
                cells.append(f"{v}/{r['num_modes']}")
            else:
                cells.append(fmt.format(v) if v != "" else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(run_dir: Path, rows: list[dict], extra: dict | None = None, note: str | None = None) -> str:
    """results.md (the table, then ``note``: e.g. which metrics the evaluator could compute) and metrics.json."""
    table = markdown_table(rows)
    (Path(run_dir) / "results.md").write_text(table + "\n" + (f"\nEvaluation: {note}\n" if note else ""))
    tmp = Path(run_dir) / "metrics.json.tmp"
    tmp.write_text(json.dumps({"rows": rows, **(extra or {})}, indent=2))
    tmp.replace(Path(run_dir) / "metrics.json")
    return table
