"""Measure the four after-distillation experiments of the captioned-digits teacher over seeds and report their targets.

    python tools/report_tuning.py --seeds 0 1 2 [--out-root runs/tuning] [--threads 1] [--note "..."] [--add] [--tries]
    python tools/report_tuning.py render     # rewrite results/tuning.md from its JSON, running nothing

Per seed, through `onestep train` as shipped plus the evaluation keys EVAL (the same 1,000 held-out-prompt samples,
reward=digits_class and the diversity per prompt in every row):
  digits_t2i_dmd2         the distilled student: PSO and NCT start from it, and its FD / reward / diversity at every
                          100 steps are the references (trainer.eval_every=100)
  digits_t2i_flash_dmd    evaluated every 50 steps: the step at which it reaches DMD2's 400-step FD
  digits_t2i_pso          objective.student= that seed's DMD2 run
  digits_t2i_diverse_cfg  against DMD2 at the same 200 steps (its quality end: diversity_weight=0 is DMD2's loss)
  digits_t2i_nct          objective.base= that seed's DMD2 run; control accuracy from its last log steps
With --tries, also the variants of TRIES (one seed each, tried against a miss), into <out-root>/tries/<label>,
each a row against its seed's DMD2 base.
A finished run folder is reused and an unfinished one resumes (the same command finishes it). results/tuning.json and
results/tuning.md are rewritten after every run, so an interrupted measurement keeps what it finished; the docs
reward-tuning page's generated block is refreshed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from statistics import mean

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from readme_block import ROOT, update_readme  # noqa: E402

RESULTS, DATA = "results/tuning.md", "results/tuning.json"
BASE, FLASH, PSO, DIVERSE, NCT = ("digits_t2i_dmd2", "digits_t2i_flash_dmd", "digits_t2i_pso", "digits_t2i_diverse_cfg",
                                  "digits_t2i_nct")
EVAL = ["reward=digits_class", "eval.num_samples=1000", "eval.teacher_steps=[1]", "eval.rewards.diversity=true",
        "eval.plot=false"]
#: variants tried against the misses (label -> (experiment, seed, extra overrides)); the base is that seed's DMD2 run
TRIES = {"pso_pairs_data": (PSO, 2, ["objective.pairs=data", "data=digits_text",
                                     "data.eval_path=${onestep.asset:digits_t2i/prompts_heldout.txt}"]),
         "nct_lr_1e-3": (NCT, 2, ["trainer.generator_optim.lr=1e-3"])}
#: the reward-hacking guard: a tuned student's FD at most this multiple of the distilled student's
FD_GUARD = 1.2
#: NCT's control accuracy: the mean over the run's last this many log steps (a batch of fresh samples each)
LAST_LOGS = 5
#: the step of DMD2's curve that a 200-step run (flash_dmd, diverse_cfg) is compared with at equal steps
EQUAL_STEPS = 200


def overrides(name: str, base_run: Path) -> list[str]:
    """The keys each experiment runs with besides its yaml and EVAL."""
    return {BASE: ["trainer.eval_every=100"], FLASH: ["trainer.eval_every=50"], PSO: [f"objective.student={base_run}"],
            DIVERSE: [], NCT: [f"objective.base={base_run}"]}[name]


def run_experiment(name: str, seed: int, out_root: Path, threads: int, extra: tuple[str, ...] = (),
                   run: Path | None = None) -> Path:
    run = run or out_root / f"seed{seed}" / name
    if not (run / "metrics.json").is_file():
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        cmd = ["onestep", "train", f"experiment={name}", f"seed={seed}", *EVAL,
               *overrides(name, out_root / f"seed{seed}" / BASE), *extra, f"out_root={out_root}",
               f"hydra.run.dir={run}", "trainer.progress=false"]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, env=env)
    return run


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _point(r: dict) -> dict:
    return {k: r[k] for k in ("fd", "label_acc", "reward", "diversity") if k in r}


def train_seconds(stats: list[dict]) -> dict[int, float]:
    """Seconds of training (every phase but the periodic evaluation) up to each log step, from stats.jsonl's
    per-step phase milliseconds."""
    out, total, prev = {}, 0.0, 0
    for r in stats:
        ms = sum(v for k, v in r.items() if k.startswith("time/") and k != "time/eval_ms")
        total += (r["step"] - prev) * ms / 1000
        out[r["step"]], prev = round(total, 1), r["step"]
    return out


def run_data(run: Path) -> dict:
    """What the table reads of a finished run: its final 1-step student row, its evaluation curve (periodic and final,
    by step), training seconds by log step, wall seconds; NCT's logged control accuracies."""
    m = json.loads((run / "metrics.json").read_text())
    final = _point(next(r for r in m["rows"] if r["model"] == "student" and r["steps"] == 1))
    curve = {str(r["step"]): _point(r) for r in _jsonl(run / "evals.jsonl")} | {str(m["steps"]): final}
    stats = _jsonl(run / "stats.jsonl")
    out = {"steps": m["steps"], "final": final, "curve": curve, "wall_s": round(sum(m["seconds"].get(k, 0.0) for k in (
        "setup", "distill", "evaluate")), 1), "train_s": {str(k): v for k, v in train_seconds(stats).items()}}
    pairs = [r["gen/pso_pairs"] for r in stats if "gen/pso_pairs" in r]
    if pairs:  # PSO: the share of a batch's reward pairs that were no tie
        out["pso_pairs"] = mean(pairs)
    logged = [r for r in stats if "gen/control_acc" in r][-LAST_LOGS:]
    if logged:
        out["control_acc"] = mean(r["gen/control_acc"] for r in logged)
        out["base_control_acc"] = mean(r["gen/base_control_acc"] for r in logged)
        batch = yaml.safe_load((run / "config.yaml").read_text())["trainer"]["batch_size"]  # (its resolved config)
        out["control_samples"] = len(logged) * batch  # the fresh samples the accuracies were measured on
    return out


# ---- rendering: results/tuning.md from results/tuning.json alone --------------------------------------------------

def _met(ok: bool | None, miss: str = "") -> str:
    if ok is None:
        return "n/a"
    return "met" if ok else f"NOT met{' (' + miss + ')' if miss else ''}"


def _f(v, fmt="{:.2f}") -> str:
    return "" if v is None else fmt.format(v)


def _at(run: dict, step: int, key: str):
    return run["curve"].get(str(step), {}).get(key)


def flash_row(seed: str, runs: dict) -> dict | None:
    b, f = runs.get(BASE), runs.get(FLASH)
    if b is None or f is None:
        return None
    ref_fd = b["final"]["fd"]
    reach, dmd2_reach = _reach(f, ref_fd), _reach(b, ref_fd)  # (DMD2's own curve may reach its final FD early)
    return {"seed": seed, "fd": f["final"]["fd"], "reward": f["final"]["reward"],
            "dmd2_fd_eq": _at(b, EQUAL_STEPS, "fd"), "dmd2_reward_eq": _at(b, EQUAL_STEPS, "reward"),
            "dmd2_fd": ref_fd, "dmd2_steps": b["steps"], "steps": f["steps"], "reach": reach, "dmd2_reach": dmd2_reach,
            "cost_steps": None if reach is None else reach / dmd2_reach,
            "cost_s": None if reach is None or str(reach) not in f["train_s"] else
            f["train_s"][str(reach)] / b["train_s"][str(dmd2_reach)]}


def _reach(run: dict, fd: float) -> int | None:
    """The first evaluated step at which ``run``'s FD is at most ``fd`` (None: never)."""
    return min((int(s) for s, p in run["curve"].items() if p["fd"] <= fd), default=None)


def pso_row(seed: str, runs: dict) -> dict | None:
    b, p = runs.get(BASE), runs.get(PSO)
    if b is None or p is None:
        return None
    return {"seed": seed, "fd": p["final"]["fd"], "reward": p["final"]["reward"], "start_fd": b["final"]["fd"],
            "start_reward": b["final"]["reward"], "label_acc": p["final"]["label_acc"],
            "start_label_acc": b["final"]["label_acc"], "diversity": p["final"]["diversity"],
            "start_diversity": b["final"]["diversity"], "pairs": p.get("pso_pairs")}


def diverse_row(seed: str, runs: dict) -> dict | None:
    b, d = runs.get(BASE), runs.get(DIVERSE)
    if b is None or d is None:
        return None
    return {"seed": seed, "fd": d["final"]["fd"], "diversity": d["final"]["diversity"],
            "dmd2_fd_eq": _at(b, EQUAL_STEPS, "fd"), "dmd2_diversity_eq": _at(b, EQUAL_STEPS, "diversity")}


def nct_row(seed: str, runs: dict) -> dict | None:
    n = runs.get(NCT)
    if n is None or "control_acc" not in n:
        return None
    return {"seed": seed, "control_acc": n["control_acc"], "base_control_acc": n["base_control_acc"],
            "samples": n["control_samples"]}


def _mean_row(rows: list[dict]) -> dict:
    out = {"seed": "mean"}
    for k in rows[0]:
        vals = [r[k] for r in rows]
        if k != "seed":
            out[k] = mean(vals) if all(isinstance(v, (int, float)) for v in vals) else None
    return out


def _guard(fd, ref) -> str:
    if fd is None or ref is None:
        return _met(None)
    return _met(fd <= FD_GUARD * ref, f"{fd / ref:.2f}x")


def _up(v, ref) -> str:
    if v is None or ref is None:
        return _met(None)
    return _met(v > ref, f"{v - ref:+.4f}")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def render(data: dict) -> str:
    """results/tuning.md from results/tuning.json."""
    seeds = data["seeds"]
    asked = data["asked"]
    done = [s for s in asked if all(name in seeds.get(s, {}) for name in (BASE, FLASH, PSO, DIVERSE, NCT))]
    lines = [f"Command: `python tools/report_tuning.py --seeds {' '.join(asked)}`"
             f" on {data['machine']}{', ' + data['note'] if data.get('note') else ''}.", "",
             "The after-distillation targets on the shipped captioned-digits teacher: each experiment as shipped "
             "(`onestep train experiment=<name> seed=<seed>`), every run evaluated on the same 1,000 held-out-prompt "
             "samples (FD in the shipped digits feature space, reward = `digits_class`: mean log p(prompted digit), "
             "diversity = mean pairwise cosine distance per prompt). The distilled student is `digits_t2i_dmd2` "
             f"(400 steps, evaluated every 100) of the same seed; the FD guard is FD <= {FD_GUARD}x the reference's.",
             "",
             f"Seeds with every experiment finished: {', '.join(done) or 'none'} (asked: {', '.join(asked)})" +
             ("" if len(done) == len(asked) else
              f" (the rest did not fit the session; `python tools/report_tuning.py --seeds {' '.join(asked)}` "
              "finishes them, reusing the finished runs)") + "."]

    rows = [r for r in (flash_row(s, seeds[s]) for s in sorted(seeds)) if r]
    if rows:
        lines += ["", f"**flash_dmd** ({rows[0]['steps']} steps, joint RL from step 100) against DMD2 "
                  f"({rows[0]['dmd2_steps']} steps): the first evaluated step at which each reaches DMD2's "
                  f"{rows[0]['dmd2_steps']}-step FD (Flash-DMD evaluated every 50 steps, DMD2 every 100) and "
                  "Flash-DMD's cost there as a share of DMD2's steps and training seconds to the same FD (target: "
                  f"fewer steps); FD guard and reward against DMD2 at the same {EQUAL_STEPS} steps.", ""]
        body = []
        for r in rows + ([_mean_row(rows)] if len(rows) > 1 else []):
            reached = [x for x in (rows if r["seed"] == "mean" else [r])]
            cheaper = all(x["reach"] is not None and x["reach"] < x["dmd2_reach"] for x in reached)
            miss = (f"FD {r['fd']:.1f} vs {r['dmd2_fd']:.1f}" if r["reach"] is None else
                    f"{r['reach']:.0f} vs {r['dmd2_reach']:.0f} steps")
            body.append([str(r["seed"]), _f(r["fd"]), _f(r["dmd2_fd_eq"]), _f(r["dmd2_fd"]), _f(r["reward"], "{:.4f}"),
                         _f(r["dmd2_reward_eq"], "{:.4f}"), _f(r["dmd2_reach"], "{:.0f}"),
                         _f(r["reach"], "{:.0f}") or f"not in {r['steps']:.0f}", _f(r["cost_steps"]), _f(r["cost_s"]),
                         _met(cheaper, miss), _guard(r["fd"], r["dmd2_fd_eq"]), _up(r["reward"], r["dmd2_reward_eq"])])
        lines += _table(["seed", "FD", f"DMD2 FD @{EQUAL_STEPS}", "DMD2 FD", "reward", f"DMD2 reward @{EQUAL_STEPS}",
                         "DMD2 reaches its FD at", "Flash-DMD reaches it at", "step cost", "train-s cost",
                         "target: DMD2's FD in fewer steps", "target: FD guard", "target: reward up"], body)
        lines += ["", "DMD2's held-out FD is lowest early and rises with more steps here, so the 400-step FD is "
                  "reached by DMD2 itself at its first evaluation. Tried: the shipped split (DM loss on t >= 0.5, "
                  "GAN on t <= 0.5, joint RL from step 100). Not tried yet: stage 1 alone (`objective.rl_weight=0`), "
                  "a lower split."]

    rows = [r for r in (pso_row(s, seeds[s]) for s in sorted(seeds)) if r]
    if rows:
        lines += ["", "**pso** (from the seed's DMD2 student, reward pairs ranked by `digits_class`, ties under "
                  "`objective.tie` left out): reward up and the FD guard against the starting student.", ""]
        body = [[str(r["seed"]), _f(r["start_fd"]), _f(r["fd"]), _f(r["start_reward"], "{:.4f}"),
                 _f(r["reward"], "{:.4f}"), _f(r["start_label_acc"], "{:.1%}"), _f(r["label_acc"], "{:.1%}"),
                 _f(r["start_diversity"], "{:.4f}"), _f(r["diversity"], "{:.4f}"), _f(r["pairs"], "{:.1%}"),
                 _up(r["reward"], r["start_reward"]), _guard(r["fd"], r["start_fd"])]
                for r in rows + ([_mean_row(rows)] if len(rows) > 1 else [])]
        lines += _table(["seed", "start FD", "FD", "start reward", "reward", "start label acc", "label acc",
                         "start diversity", "diversity", "untied pairs", "target: reward up", "target: FD guard"],
                        body)
        lines += ["", "Tried: ties left out (`objective.tie`; the share of pairs that were no tie is above). The FD "
                  "still rises as it did with every pair counted, though most steps then have no pair left and a loss "
                  "of 0: ranking noise is not the whole cause. Suspected: AdamW scales the rare, tiny gradients of "
                  "the pairs left up to full-size steps, which keep moving the student through the momentum. Tried: "
                  "the paper's reference-set pairing (`pso_pairs_data` below: `objective.pairs=data` with "
                  "`data=digits_text`, the data's digits preferred over the student's samples). Not tried yet: a "
                  "smaller learning rate."]

    rows = [r for r in (diverse_row(s, seeds[s]) for s in sorted(seeds)) if r]
    if rows:
        lines += ["", f"**diverse_cfg** (as shipped, {EQUAL_STEPS} steps) against DMD2 at the same {EQUAL_STEPS} "
                  "steps (the quality end: the same loss without the diversity term): diversity up and the FD guard.",
                  ""]
        body = [[str(r["seed"]), _f(r["dmd2_fd_eq"]), _f(r["fd"]), _f(r["dmd2_diversity_eq"], "{:.4f}"),
                 _f(r["diversity"], "{:.4f}"), _up(r["diversity"], r["dmd2_diversity_eq"]),
                 _guard(r["fd"], r["dmd2_fd_eq"])] for r in rows + ([_mean_row(rows)] if len(rows) > 1 else [])]
        lines += _table(["seed", f"DMD2 FD @{EQUAL_STEPS}", "FD", f"DMD2 diversity @{EQUAL_STEPS}", "diversity",
                         "target: diversity up", "target: FD guard"], body)

    rows = [r for r in (nct_row(s, seeds[s]) for s in sorted(seeds)) if r]
    if rows:
        lines += ["", f"**nct** (lowres 4x4 control, adapter on the seed's DMD2 student): control accuracy = 1-of-N "
                  "identification of each fresh sample's control among its batch's (chance 1/32), mean over the "
                  f"run's last {LAST_LOGS} log steps; the base is the frozen student given the same prompts without "
                  "the control.", ""]
        body = []
        for r in rows + ([_mean_row(rows)] if len(rows) > 1 else []):
            n = r["samples"] * (len(rows) if r["seed"] == "mean" else 1)
            se = (r["base_control_acc"] * (1 - r["base_control_acc"]) / n) ** 0.5
            gain = r["control_acc"] - r["base_control_acc"]
            body.append([str(r["seed"]), f"{n:.0f}", _f(r["base_control_acc"], "{:.1%}"),
                         _f(r["control_acc"], "{:.1%}"),
                         _met(gain > 2 * se, f"{100 * gain:+.1f} points, 2 SE = {200 * se:.1f}")])
        lines += _table(["seed", "samples", "base control acc", "control acc",
                         "target: control followed (gain > 2 binomial SE)"], body)
        lines += ["", "In the shipped 200 steps (learning rate 1e-4) the zero-initialised ControlNet's output "
                  "convolutions barely leave zero, so the adapted generator still draws what the base draws. Tried: "
                  "a 10x adapter learning rate (`nct_lr_1e-3` below): the control accuracy stays at the base's and the "
                  "zero convolutions still barely move, so the NCT gradients on the adapter mostly cancel from batch "
                  "to batch rather than being too small. Not tried yet: many more steps (the paper trains for "
                  "thousands), a larger batch."]
    lines += _tries(data)
    return "\n".join(lines) + "\n"


def _tries(data: dict) -> list[str]:
    """The variants tried against the misses: one seed each, against that seed's DMD2 base."""
    rows = []
    for label, t in data.get("tries", {}).items():
        b = data["seeds"].get(str(t["seed"]), {}).get(BASE)
        if b is None:
            continue
        f, bf = t["final"], b["final"]
        control = ("" if "control_acc" not in t else
                   f"{t['control_acc']:.1%} (base {t['base_control_acc']:.1%})")
        rows.append([f"`{label}`", f"`{t['experiment']}` {' '.join(f'`{o}`' for o in t['overrides'])}",
                     str(t["seed"]), _f(bf["fd"]), _f(f["fd"]), _f(bf["reward"], "{:.4f}"), _f(f["reward"], "{:.4f}"),
                     _f(bf["diversity"], "{:.4f}"), _f(f["diversity"], "{:.4f}"), control,
                     _up(f["reward"], bf["reward"]), _guard(f["fd"], bf["fd"])])
    if not rows:
        return []
    return ["", "**Tried against the misses** (`--tries`; one seed each, against that seed's distilled DMD2 student; "
                "an NCT run's evaluation samples without a control, so its FD / reward are the base's):", "",
            *_table(["variant", "run", "seed", "base FD", "FD", "base reward", "reward", "base diversity", "diversity",
                     "control acc (last logs)", "target: reward up", "target: FD guard"], rows)]


def rendered(folder: Path) -> dict[str, str]:
    """The markdown this tool writes, rendered from ``folder``'s tuning.json alone (nothing before its first run)."""
    path = folder / "tuning.json"
    return {"tuning.md": render(json.loads(path.read_text()))} if path.is_file() else {}


def write(data: dict) -> None:
    (ROOT / DATA).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    (ROOT / RESULTS).write_text(rendered(ROOT / "results")["tuning.md"], encoding="utf-8")
    update_readme(RESULTS)


def main() -> None:
    if sys.argv[1:] == ["render"]:  # rewrite the markdown from its data, running nothing
        for name, text in rendered(ROOT / "results").items():
            (ROOT / "results" / name).write_text(text, encoding="utf-8")
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out-root", default="runs/tuning")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--note", help="how the runs were timed, shown beside the command (e.g. a shared machine)")
    ap.add_argument("--tries", action="store_true", help="also run the variants of TRIES (after the seeds)")
    ap.add_argument("--add", action="store_true",
                    help="keep the seeds results/tuning.json already holds and add these (their run folders may be gone)")
    args = ap.parse_args()
    out_root = Path(args.out_root).resolve()
    machine = f"{args.threads} torch thread(s)"
    data = {"asked": [str(s) for s in args.seeds], "machine": machine, "seeds": {},
            **({"note": args.note} if args.note else {})}
    if args.add and (ROOT / DATA).is_file():
        old = json.loads((ROOT / DATA).read_text())
        kept = {s: v for s, v in old["seeds"].items() if int(s) not in args.seeds}
        data.update(asked=sorted(set(old["asked"]) | set(data["asked"]), key=int), seeds=kept,
                    tries=old.get("tries", {}))
    for seed in args.seeds:  # seed by seed, the shortest runs first: a stopped measurement keeps whole rows
        for name in (BASE, PSO, NCT, DIVERSE, FLASH):
            run = run_experiment(name, seed, out_root, args.threads)
            data["seeds"].setdefault(str(seed), {})[name] = run_data(run)
            write(data)
    for label, (name, seed, extra) in (TRIES.items() if args.tries else ()):
        run_experiment(name, seed, out_root, args.threads, tuple(extra), out_root / "tries" / label)
        data.setdefault("tries", {})[label] = {"experiment": name, "seed": seed, "overrides": extra,
                                               **run_data(out_root / "tries" / label)}
        runs = data["seeds"].setdefault(str(seed), {})
        if BASE not in runs:  # the row compares against it (with --add it may come from the JSON alone)
            runs[BASE] = run_data(out_root / f"seed{seed}" / BASE)
        write(data)
    print(rendered(ROOT / "results")["tuning.md"])


if __name__ == "__main__":
    main()
