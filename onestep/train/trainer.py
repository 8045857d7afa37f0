"""The training loop: generator + frozen teacher + (optional) critic, alternating updates with TTUR.

Order of events per step (reads top to bottom in ``train``):
    seed this step's RNG -> critic updates (objective.critic_updates times) -> one generator update
    -> EMA -> stats line -> checkpoint -> periodic eval/samples
Resume is "run the same command again": the run folder is the identity and the newest valid checkpoint
is picked up; every step reseeds from (seed, step, rank), so an interrupted and resumed run is
bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator

from onestep import checkpoint, experiment, progress
from onestep.denoisers.base import guided
from onestep.eval.report import compare, eval_inputs, write_report
from onestep.experiment import shape_student
from onestep.generator import Student
from onestep.networks import EMA, Networks, check_networks
from onestep.objectives import make_objective
from onestep.train.run_dir import prepare_run_dir


class NonFiniteLoss(RuntimeError):
    pass


def train(cfg, run_dir: str | Path | None = None, callbacks: tuple[Callable[[int, dict], None], ...] = ()) -> dict:
    t_begin = time.perf_counter()
    run_dir = prepare_run_dir(cfg, run_dir)
    tc = cfg.trainer
    acc = Accelerator(mixed_precision=tc.mixed_precision, cpu=tc.cpu)
    show = tc.progress and acc.is_main_process

    make_objective(cfg.objective, generate=None)  # validate its hyperparameters before any slow setup
    check_networks(cfg)
    torch.manual_seed(cfg.seed)  # network inits and anything else drawn while building the experiment
    setup = experiment.build(cfg, run_dir, progress=show)
    gc = cfg.generator
    student = Student(setup.teacher.schedule, gc.steps, gc.ts, gc.method, gc.sigma_init)
    objective = make_objective(cfg.objective, student.train_sample)
    torch.manual_seed(cfg.seed + 1)  # extra modules start the same whether the teacher was trained or cached
    heads = objective.build_modules(setup)
    objective.trains_critic_modules = any(role == "critic" for _, role in heads.values())
    networks = Networks(cfg, setup, critic="critic" in objective.networks, heads=heads,
                        targets=objective.targets(), device=acc.device, shape=partial(shape_student, gc))
    teacher = guided(networks.teacher, cfg.teacher.guidance)
    nets = networks.nets(teacher)
    if acc.is_main_process:
        print(networks.describe(), flush=True)

    opt_g = acc.prepare(_adamw(networks.params("generator"), tc.generator_optim))
    c_params = networks.params("critic")
    opt_c = acc.prepare(_adamw(c_params, tc.critic_optim)) if c_params else None
    state = checkpoint.load_latest(run_dir, networks.checkpointed())  # loads weights in place
    start = 0
    if state is not None:
        start = state["step"]
        opt_g.load_state_dict(state["opt_generator"])
        if opt_c is not None:
            opt_c.load_state_dict(state["opt_critic"])
    ema = networks.unwrapped(EMA)

    stats_file = Path(run_dir) / "stats.jsonl"
    bar = progress.bar(range(start, tc.steps), initial=start, total=tc.steps, desc="distill", disable=not show)
    bad_steps, t0 = 0, time.perf_counter()
    seconds = {"setup": round(t0 - t_begin, 1), "resumed_at_step": start}
    for step in bar:
        _seed(cfg.seed, step, acc)
        logs: dict[str, float] = {}
        for _ in range(objective.critic_updates):
            batch = setup.data.batch(tc.batch_size, acc.device)
            with acc.autocast():
                out = objective.critic_loss(nets, batch, step)
            bad_steps = _update(acc, networks, "critic", out, opt_c, tc.grad_clip, bad_steps, tc.max_bad_steps)
            logs.update({f"critic/{k}": float(v.detach()) for k, v in out.items()})
        batch = setup.data.batch(tc.batch_size, acc.device)
        with acc.autocast():
            out = objective.generator_loss(nets, batch, step)
        bad_steps = _update(acc, networks, "generator", out, opt_g, tc.grad_clip, bad_steps, tc.max_bad_steps)
        logs.update({f"gen/{k}": float(v.detach()) for k, v in out.items()})
        networks.update_targets()

        done = step + 1
        main = acc.is_main_process
        if main and (done % tc.log_every == 0 or done == tc.steps):
            rate = (done - start) / (time.perf_counter() - t0)
            bar.set_postfix({k.split("/")[0][0] + ":" + k.split("/")[1]: f"{v:.3g}" for k, v in logs.items()
                             if k.endswith("loss")} | {"it/s": f"{rate:.1f}"}, refresh=False)
            _append(stats_file, {"step": done, "it_per_s": rate, **logs})
        if done % tc.checkpoint_every == 0 or done == tc.steps:
            # every rank takes part (sharded states gather here); the main process writes
            states = networks.checkpointed()
            if main:
                checkpoint.save(run_dir, done, states, _state(done, opt_g, opt_c), keep=tc.keep_checkpoints)
            acc.wait_for_everyone()
        if main and tc.eval_every and done % tc.eval_every == 0 and done != tc.steps:
            _append(Path(run_dir) / "evals.jsonl", {"step": done, **_eval_student(setup, student, ema, cfg.eval)})
        if main and tc.sample_every and done % tc.sample_every == 0:
            _plot_samples(setup, student, ema, run_dir / f"samples_{done:08d}.png")
        for cb in callbacks:
            cb(done, logs)
    bar.close()

    if not acc.is_main_process:
        return {}
    t_eval = time.perf_counter()
    seconds["distill"] = round(t_eval - t0, 1)
    rows, samples = compare(setup, student, ema, teacher, cfg.eval, progress=show)
    seconds["evaluate"] = round(time.perf_counter() - t_eval, 1)
    # wall seconds of this process (a resumed run counts from resumed_at_step)
    table = write_report(run_dir, rows, {"steps": tc.steps, "objective": cfg.objective.name, "seconds": seconds},
                         note=getattr(setup.evaluator, "what", None))
    if cfg.eval.plot:
        pick = [f"teacher {s} step{'s' if s > 1 else ''}" for s in (1, max(cfg.eval.teacher_steps))] + \
               [k for k in samples if k.startswith("student")][:1]
        setup.evaluator.plot(run_dir / "samples.png", {k: samples[k] for k in dict.fromkeys(pick) if k in samples})
    print(f"\n{table}\n\nrun folder: {run_dir}")
    return {"rows": rows, "run_dir": str(run_dir), "networks": networks, "optimizers": (opt_g, opt_c)}


def _adamw(params, oc):
    return torch.optim.AdamW(params, lr=oc.lr, betas=tuple(oc.betas), weight_decay=oc.weight_decay)


def _seed(seed: int, step: int, acc: Accelerator) -> None:
    torch.manual_seed((seed * 1_000_003 + step) * 64 + acc.process_index)


def _update(acc, networks, what, out, opt, clip, bad_steps, max_bad) -> int:
    """Backward + clip + step; a non-finite loss skips the step (and counts toward the run's limit)."""
    loss = out["loss"]
    if not torch.isfinite(loss):
        bad_steps += 1
        opt.zero_grad(set_to_none=True)
        if bad_steps > max_bad:
            raise NonFiniteLoss(f"{what} loss was non-finite for {bad_steps} consecutive updates; lower the "
                                "learning rate (trainer.*_optim.lr) or enable trainer.grad_clip")
        return bad_steps
    acc.backward(loss)
    networks.reduce_gradients(what)
    if clip > 0:
        acc.clip_grad_norm_(networks.params(what), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return 0


def _append(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


@torch.no_grad()
def _student_samples(setup, student, net, n: int):
    """n samples of the student at its training step count, from the fixed evaluation noise (seed 0)."""
    noise, cond = eval_inputs(setup, n, 0)
    device = next(net.parameters()).device
    return student.sample(net, noise.to(device), None if cond is None else cond.to(device)).cpu(), cond


def _eval_student(setup, student, net, eval_cfg, max_samples: int = 2000) -> dict:
    """Periodic check of the EMA student at its training step count (a capped sample count)."""
    x, cond = _student_samples(setup, student, net, min(eval_cfg.num_samples, max_samples))
    return {k: v for k, v in setup.evaluator.metrics(x, cond).items() if not isinstance(v, list)}


def _state(step, opt_g, opt_c) -> dict:
    s = {"step": step, "opt_generator": opt_g.state_dict(), "rng": torch.get_rng_state()}
    if opt_c is not None:
        s["opt_critic"] = opt_c.state_dict()
    return s


def _plot_samples(setup, student, net, path):
    x, cond = _student_samples(setup, student, net, 2000)
    setup.evaluator.plot(path, {"student (EMA)": (x, cond)})

