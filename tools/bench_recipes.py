"""Previous vs official-code recipe of each objective on the exact 2-D mixtures (issues 18, 19).

    OMP_NUM_THREADS=2 python tools/bench_recipes.py [only=dmd2,sid] [seeds=1] [out=results] [root=runs/bench_recipes] \
        [hydra.key=value ...]
    python tools/bench_recipes.py render      # rewrite recipes_gmm.md from recipes_gmm.json, running nothing

For each row of RECIPES it trains the shipped experiment (``gmm_<objective>``, its own steps and settings, plus the row's
common overrides: dmd2_gan switches DMD2's GAN on) twice: as shipped ("previous") and with the official-code options
("official"), once per seed (``seeds=N``: seed=0..N-1; the table gives mean +- std over them), and reads the final
evaluation of the EMA
generator (1 step) and of the teacher's 64-step DDIM on the same evaluation noise: sliced-W2, its ratio to the
teacher's, modes covered, the worst per-mode relative mass error (training wall times, kept in the JSON, are left out
of the table: on a shared machine they measure the other jobs). Arguments with a dot are Hydra overrides added to
every run (e.g. trainer.steps=20 for a smoke run). Writes <out>/recipes_gmm.{json,md} (the commands at the top of the
markdown) and refreshes its README block. Rows of objectives this invocation does not run are kept from the previous
recipes_gmm.json, so the bench can run in parts (``only=``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import onestep.config  # noqa: F401
import onestep.objectives  # noqa: F401
from onestep.train.trainer import train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from readme_block import ROOT, update_readme  # noqa: E402

#: row -> (experiment, the official code's options, where they come from[, overrides both recipes share])
RECIPES: dict[str, tuple] = {
    "dmd2": ("gmm_dmd2", ["objective.t_dist=grid"], "tianweiy/DMD2 main/edm/edm_guidance.py:82-92"),
    "sid": ("gmm_sid", ["objective.t_dist=karras", "objective.t_lo=0.0", "objective.t_hi=0.8"],
            "mingyuanzhou/SiD training/sid_loss.py:27-33"),
    "rcm": ("gmm_rcm", ["objective.tangent_warmup=rcm", "objective.sigma_data=1.0",
                        "objective.adaptive_weighting=false", "objective.dm_weight=0.02"],
            "NVlabs/rcm rcm/models/t2v_model_distill_rcm.py"),
    "fdistill": ("gmm_fdistill", ["objective.normalization=ratio_bins", "objective.ratio_lower=0.1",
                                  "objective.ratio_upper=20", "objective.log_ratio_clamp=10",
                                  "objective.max_weight=inf"],
                 "NVlabs/FastGen fastgen/methods/distribution_matching/f_distill.py"),
    "scd": ("gmm_scd", ["objective.tangent_norm=rms", "objective.prior_weighting=true",
                        "objective.divide_by_dim=true"],
            "NVlabs/FastGen fastgen/methods/consistency_model/sCM.py"),
    "vsd": ("gmm_vsd", ["objective.weighting=sigma2", "objective.critic_weighting=alpha2_eps"],
            "VinAIResearch/SwiftBrush train_swiftbrush.py:781-782, :817-822"),
    "dmd2_gan": ("gmm_dmd2", ["objective.disc_weight=1e-2", "objective.gan_t_dist=grid", "objective.gan_t_lo=0.0",
                              "objective.gan_t_hi=1.0"],
                 "tianweiy/DMD2 main/edm/edm_guidance.py:174-179, experiments/imagenet/*genloss3e-3*.sh:24-28",
                 ["objective.discriminator=critic", "objective.gan_weight=3e-3"]),
    "sida": ("gmm_sida", ["objective.gan_balance=official", "objective.gan_weight=1e-4",
                          "objective.gan_start_images=200000", "objective.gan_head=channel_mean",
                          "objective.t_dist=karras", "objective.t_lo=0.0", "objective.t_hi=0.8"],
             "mingyuanzhou/SiD branch sida sida_training/sida_loss.py, sida_training_loop.py:401-411, run_sida.sh"),
}
EVAL = ["trainer.progress=false", "eval.teacher_steps=[64]", "eval.plot=false"]


def compose_cfg(overrides: list[str]):
    with initialize_config_module("onestep.configs", version_base="1.3"):
        return compose("config", overrides=overrides)


def run(name: str, recipe: str, overrides: list[str], root: Path, teachers: dict[str, Path]) -> dict:
    """One training run; the DSM-trained teacher net is shared by runs with the same teacher config."""
    cfg = compose_cfg(overrides + EVAL)
    folder = root / f"{name}_{recipe}_seed{cfg.seed}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    key = OmegaConf.to_yaml(cfg.teacher) + f"seed={cfg.seed}"
    if key in teachers:
        shutil.copy(teachers[key], folder / "teacher_net.safetensors")
    t0 = time.perf_counter()
    out = train(cfg, folder)
    wall = time.perf_counter() - t0
    teachers.setdefault(key, folder / "teacher_net.safetensors")
    student = next(r for r in out["rows"] if r["model"] == "student")
    teacher = next(r for r in out["rows"] if r["model"] == "teacher")
    return {"objective": name, "recipe": recipe, "seed": cfg.seed, "steps": cfg.trainer.steps,
            "mixture": cfg.teacher.mixture,
            "sliced_w2": student["sliced_w2"], "teacher_w2": teacher["sliced_w2"],
            "modes": f"{student['modes_covered']}/{student['num_modes']}",
            "worst_mass_err": student["worst_mode_mass_err"], "wall_s": wall, "samples": cfg.eval.num_samples}


def _stat(values: list[float], fmt: str) -> str:
    """One value, or mean +- sample std over seeds."""
    if len(values) == 1:
        return format(values[0], fmt)
    t = torch.tensor(values, dtype=torch.float64)
    return f"{format(float(t.mean()), fmt)} ± {format(float(t.std()), fmt)}"


def markdown(rows: list[dict], commands: list[str]) -> str:
    lines = ["# Paper recipes on exact 2-D mixtures: previous vs official code", "",
             f"Written by {' and '.join(f'`{c}`' for c in commands)} (CPU, a machine shared with other jobs). "
             "Each row is the shipped `gmm_<objective>` experiment (its steps, batch and learning rates; `dmd2_gan` "
             "is `gmm_dmd2` with DMD2's GAN on, `objective.discriminator=critic objective.gan_weight=3e-3`, in both "
             "recipes), as shipped (`previous`) or with the official code's options (`official`, overrides below); "
             "seeds gives the runs a row averages (mean ± std when more than one). Final evaluation: the EMA "
             f"generator at 1 step vs exact mixture samples ({rows[0]['samples']:,}), the teacher's 64-step DDIM on "
             "the same noise.", "",
             "| objective | experiment | mixture | steps | recipe | seeds | sliced-W2 | x teacher-64 | modes | "
             "worst mode mass err |", "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["objective"], r["recipe"]), []).append(r)
    for (name, recipe), rs in groups.items():
        r = rs[0]
        modes = sorted({x["modes"] for x in rs})
        lines.append(f"| `{name}` | `{RECIPES[name][0]}` | {r['mixture']} | {r['steps']} | {recipe} | {len(rs)} | "
                     f"{_stat([x['sliced_w2'] for x in rs], '.4f')} | "
                     f"{_stat([x['sliced_w2'] / x['teacher_w2'] for x in rs], '.2f')} | {', '.join(modes)} | "
                     f"{_stat([100 * x['worst_mass_err'] for x in rs], '.1f')}% |")
    lines += ["", "Official options per objective (source):", ""]
    for name in dict.fromkeys(r["objective"] for r in rows):
        opts, src = RECIPES[name][1], RECIPES[name][2]
        lines.append(f"- `{name}`: `{' '.join(opts)}` ({src})")
    return "\n".join(lines) + "\n"


def write(out: Path, rows: list[dict], commands: list[str]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipes_gmm.json").write_text(json.dumps({"commands": commands, "rows": rows}, indent=1) + "\n")
    path = out / "recipes_gmm.md"
    path.write_text(rendered(out)["recipes_gmm.md"])
    if path.resolve().parent == (ROOT / "results").resolve():
        update_readme("results/recipes_gmm.md")
    return path


def rendered(folder: Path) -> dict[str, str]:
    """The markdown this tool writes, rendered from ``folder``'s recipes_gmm.json alone."""
    saved = json.loads((folder / "recipes_gmm.json").read_text())
    return {"recipes_gmm.md": markdown(saved["rows"], saved["commands"])}


def main(argv: list[str]) -> int:
    if argv == ["render"]:
        saved = json.loads((ROOT / "results" / "recipes_gmm.json").read_text())
        print(write(ROOT / "results", saved["rows"], saved["commands"]).read_text())
        return 0
    args = dict(a.split("=", 1) for a in argv if "=" in a and "." not in a.split("=", 1)[0])
    extra = [a for a in argv if "=" in a and "." in a.split("=", 1)[0]]
    only = args["only"].split(",") if "only" in args else list(RECIPES)
    unknown = [n for n in only if n not in RECIPES]
    if unknown:
        print(f"bench_recipes: unknown objective(s) {unknown}; choose from {list(RECIPES)}", file=sys.stderr)
        return 2
    out, root = Path(args.get("out", ROOT / "results")), Path(args.get("root", "runs/bench_recipes"))
    seeds = int(args.get("seeds", 1))
    threads = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
    command = f"OMP_NUM_THREADS={threads} python tools/bench_recipes.py " + " ".join(argv)
    teachers: dict[str, Path] = {}
    rows = []
    for name in only:
        exp, official, _, *shared = RECIPES[name]
        shared = shared[0] if shared else []
        for seed in range(seeds):
            for recipe, opts in (("previous", []), ("official", official)):
                overrides = [f"experiment={exp}", f"seed={seed}", *shared, *extra, *opts]
                rows.append(run(name, recipe, overrides, root, teachers))
                print(rows[-1], flush=True)
    saved = out / "recipes_gmm.json"
    kept, commands = [], [command.strip()]
    if saved.exists():
        old = json.loads(saved.read_text())
        kept = [r for r in old["rows"] if r["objective"] not in only]
        commands = [c for c in old["commands"] if kept] + commands
    order = list(RECIPES)
    rows = sorted(kept + rows, key=lambda r: (order.index(r["objective"]), r["recipe"] != "previous", r.get("seed", 0)))
    print(write(out, rows, commands).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
