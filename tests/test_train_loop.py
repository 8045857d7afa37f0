"""The trainer's shape, read from its source: the loop of ``train`` fits one screen, the trainer writes nothing onto
the objective (it passes the run through ``Objective.set_run``), and one constructor builds the student sampler
from the generator config (issue 30, STYLE.md 5)."""

from __future__ import annotations

import ast
from pathlib import Path

from torch import nn

from conftest import compose
from onestep.objectives import make_objective

ROOT = Path(__file__).resolve().parents[1]
#: lines of the body of the loop in ``train`` (DiT's train.py: the order of events on one screen)
MAX_LOOP_LINES = 40


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def loop_body_lines(tree: ast.Module, function: str = "train") -> int:
    """Physical lines of the body of the (outermost) for / while loop in ``function``, blank and comment lines
    included."""
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function)
    loop = next(n for n in ast.walk(fn) if isinstance(n, (ast.For, ast.While)))
    return loop.body[-1].end_lineno - loop.lineno


def test_the_training_loop_fits_one_screen():
    n = loop_body_lines(_tree(ROOT / "onestep" / "train" / "trainer.py"))
    assert 0 < n <= MAX_LOOP_LINES, f"train()'s loop body is {n} lines (at most {MAX_LOOP_LINES}): move bookkeeping " \
                                    "into helpers (train/step_log.py, _role_update, _save, _periodic)"


def test_the_line_count_sees_a_long_loop():
    body = "\n".join(f"        x += {i}" for i in range(MAX_LOOP_LINES + 1))
    assert loop_body_lines(ast.parse(f"def train():\n    x = 0\n    for _ in range(2):\n{body}\n")) == MAX_LOOP_LINES + 1


def _py_files(*folders: str):
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_the_trainer_writes_no_field_onto_the_objective():
    """What the objective needs from the run reaches it through its constructor or Objective.set_run."""
    found = []
    for path in _py_files("onestep/train"):
        for node in ast.walk(_tree(path)):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            for t in targets:
                owner = t.value if isinstance(t, ast.Attribute) else None
                name = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) \
                    else None
                if name in ("objective", "obj"):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(t)} = ...")
    assert not found, found


def test_one_place_builds_the_student_from_the_generator_config():
    """Student(...) is called only by Student.from_config (generator.py) in the package and its tools."""
    calls = []
    for path in _py_files("onestep", "tools"):
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Call) and (getattr(node.func, "id", None) == "Student"
                                               or getattr(node.func, "attr", None) == "Student"):
                calls.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert calls == [], f"build the student with Student.from_config(schedule, cfg.generator): {calls}"


def test_set_run_counts_critic_updates_of_heads_without_a_critic_network():
    """An objective without a critic network whose discriminator head is trained by the critic update (the GAN
    objective) gets objective.ttur critic updates once the trainer passed it the run's modules."""
    cfg = compose(["experiment=gmm_adversarial", "objective.ttur=3"])
    objective = make_objective(cfg.objective, None)
    assert "critic" not in objective.networks and objective.critic_updates == 0
    objective.set_run({"disc": (nn.Linear(2, 1), "critic")}, images_per_step=64)
    assert objective.critic_updates == 3 and objective.images_per_step == 64
    objective.set_run({"disc": (nn.Linear(2, 1), "generator")}, images_per_step=64)
    assert objective.critic_updates == 0


def test_step_log_reads_only_on_log_steps_and_explains_a_slow_first_step(tmp_path, capsys):
    """Between log steps the values stay as they are (no read, no line); a log step writes one stats line with
    the values averaged over the processes; a first step slower than SLOW_FIRST_STEP_S is explained, and the rate
    counts from the second step."""
    import json

    import torch
    from accelerate import Accelerator

    from onestep.train.phases import PhaseClock
    from onestep.train.step_log import SLOW_FIRST_STEP_S, StepLog

    cfg = compose(["experiment=gmm_dmd2", "trainer.steps=10", "trainer.log_with=none"])
    acc = Accelerator(cpu=True)
    halves = lambda logs: {k: v / 2 for k, v in logs.items()}  # noqa: E731  (a visible stand-in for the mean)
    log = StepLog(acc, tmp_path, cfg, 3, PhaseClock(acc.device), show=True, optimizers=(None, None), mean=halves)
    log.t0 -= SLOW_FIRST_STEP_S + 5
    logs = {"gen/loss": torch.tensor(3.0)}
    assert log.step(4, logs, read=False, bad_steps=0) is logs
    assert "first step: 15 s" in capsys.readouterr().out
    assert not (tmp_path / "stats.jsonl").exists()
    assert log.step(5, logs, read=True, bad_steps=2) == {"gen/loss": 1.5}
    (line,) = (tmp_path / "stats.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert (record["step"], record["bad_steps"], record["gen/loss"]) == (5, 2, 1.5)
    assert record["it_per_s"] > 1 / SLOW_FIRST_STEP_S  # one step since the first, not the slow first step itself
    log.close()
