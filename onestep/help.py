"""What the CLI says about itself: `onestep --help`, `onestep train [experiment=X] --help`, and the checks that
turn a key no code reads into one line with a "did you mean" (the config schemas in config.py and the
objectives' Config dataclasses are the only source: their ``#:`` field comments are the documentation).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import textwrap
from functools import cache
from importlib import resources

from omegaconf import DictConfig, OmegaConf

from onestep import teachers

#: one line per command (`onestep --help`)
COMMANDS = {
    "train": "distill a teacher into a few-step student (Hydra overrides key=value; -m for sweeps)",
    "bench": "quality vs number of function evaluations: teacher samplers and student runs, CSV + plot",
    "sample": "images from a run folder or an export folder: onestep sample run_dir=... out=grid.png",
    "export": "a run's student -> a diffusers pipeline folder: onestep export run_dir=... out=...",
    "runs": "the run folders under out_root: experiment, step, headline metric, status",
    "eval": "a run's checkpoints under one protocol, now or as they appear: onestep eval run_dir=... [watch=true]",
    "cache": "VAE latents and text embeddings of a dataset, once, over every process: onestep cache out=... data=...",
}

#: data.<field> -> the data kinds that read it
DATA_FIELDS = {"path": ("prompts", "image_text", "video_text", "webdataset"),
               "cache": ("prompts", "image_text", "digits_text", "video_text", "webdataset", "moving_digits_text"),
               "eval_path": ("prompts", "image_text", "digits_text", "video_text", "webdataset", "moving_digits_text")}
#: sections `train --help` shows, in order (bench has its own command)
SECTIONS = ("teacher", "generator", "critic", "objective", "data", "trainer", "eval")


# --- documentation from the schemas ----------------------------------------------------------------------------

@cache
def field_docs(cls: type) -> dict[str, str]:
    """field name -> its ``#:`` comment (lines joined) in the source of the dataclass or of a base class that
    declares it; the class docstring's first line is kept under "" (not dataclass's generated signature)."""
    docs: dict[str, str] = {}
    for base in reversed(cls.__mro__[1:]):
        if dataclasses.is_dataclass(base):
            docs.update({k: v for k, v in field_docs(base).items() if k})
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return docs
    pending: list[str] = []
    for line in source.splitlines():
        s = line.strip()
        if s.startswith("#:"):
            pending.append(s[2:].strip())
            continue
        m = re.match(r"(\w+)\s*:", s)
        if m and pending:
            docs[m.group(1)] = " ".join(pending)
        if not s.startswith("#"):
            pending = []
    doc = (cls.__doc__ or "").strip()
    if doc and not doc.startswith(f"{cls.__name__}("):
        docs[""] = doc.splitlines()[0]
    return docs


def field_default(f: dataclasses.Field):
    """A dataclass field's default value (its factory called); "???" for a field without one."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "???"


def schema(node) -> type | None:
    """The dataclass behind a composed config node (None for plain dicts and values)."""
    if not isinstance(node, DictConfig):
        return None
    t = OmegaConf.get_type(node)
    return t if dataclasses.is_dataclass(t) else None


def leaf_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schemas' fields (free-form dict fields count as one key)."""
    out = []
    for k in cfg:
        v = cfg[k] if not OmegaConf.is_missing(cfg, k) else None
        full = f"{prefix}{k}"
        if schema(v) is not None:
            out += leaf_keys(v, full + ".")
        else:
            out.append(full)
    return out


def unread_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    """Keys in a composed config that no schema declares (added with ``+key=...`` or by an experiment yaml): no
    code reads them."""
    cls = schema(cfg)
    if cls is None:
        return []
    fields = {f.name for f in dataclasses.fields(cls)}
    out = []
    for k in cfg:
        full = f"{prefix}{k}"
        if k not in fields:
            out.append(full)
        elif not OmegaConf.is_missing(cfg, k):
            out += unread_keys(cfg[k], full + ".")
    return out


def did_you_mean(key: str, candidates: list[str]) -> str:
    """' (did you mean a.b?)' from near misses of the whole key, then keys with the same or a close last part."""
    cands = [c for c in candidates if c != key]
    near = difflib.get_close_matches(key, cands, n=3, cutoff=0.85)
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [c for c in cands if c.rsplit(".", 1)[-1] == leaf]
    close_leaf = [c for c in cands
                  if difflib.SequenceMatcher(None, c.rsplit(".", 1)[-1], leaf).ratio() >= 0.8]
    picks = list(dict.fromkeys(near + same_leaf + close_leaf))[:3]
    return f" (did you mean {' or '.join(picks)}?)" if picks else ""


def unread_message(keys: list[str], cfg: DictConfig) -> str:
    known = leaf_keys(cfg)
    first = keys[0]
    more = f" (and {', '.join(keys[1:])})" if len(keys) > 1 else ""
    return (f"config key '{first}'{more} is not read by any code: no schema declares it{did_you_mean(first, known)}; "
            f"`onestep train --help` lists the keys that apply")


# --- experiments ------------------------------------------------------------------------------------------------

def experiments() -> dict[str, str]:
    """experiment name -> the first sentence of its yaml's leading comment."""
    out = {}
    folder = resources.files("onestep.configs") / "experiment"
    for f in sorted(folder.iterdir(), key=lambda p: p.name):
        if not f.name.endswith(".yaml"):
            continue
        text = []
        for line in f.read_text().splitlines():
            if not line.startswith("#"):
                break
            if "@package" not in line:
                text.append(line.lstrip("#").strip())
        out[f.name[:-5]] = _first_sentence(" ".join(text))
    return out


ABBREVIATIONS = ("al", "e.g", "i.e", "vs", "cf", "Fig", "Sec", "eq")


def _first_sentence(text: str, width: int = 96) -> str:
    end = len(text)
    for m in re.finditer(r"\.(\s|$)", text):
        if not text[:m.start()].endswith(ABBREVIATIONS) and not text[:m.start()][-1:].isdigit():
            end = m.start()
            break
    s = text[:end]
    return s if len(s) <= width else s[:width - 3].rstrip() + "..."


def default_experiment() -> str:
    text = (resources.files("onestep.configs") / "config.yaml").read_text()
    m = re.search(r"-\s*experiment:\s*(\S+)", text)
    return m.group(1) if m else "?"


def overview() -> str:
    width = max(map(len, COMMANDS))
    lines = ["onestep: one-step diffusion distillation", "", "usage: onestep <command> [key=value ...]", "",
             "commands:"]
    lines += [f"  {c:<{width}}  {d}" for c, d in COMMANDS.items()]
    exps = experiments()
    width = max(map(len, exps))
    lines += ["", f"experiments (onestep train experiment=<name>; default {default_experiment()}):"]
    lines += [f"  {n:<{width}}  {d}" for n, d in exps.items()]
    lines += ["", "onestep train experiment=<name> --help   the keys of one experiment, with what they do",
              "onestep train ... --cfg job              the whole composed config",
              "README.md                                commands, figures, the bad-input table"]
    return "\n".join(lines)


def command_schema(command: str) -> type | None:
    """The key=value schema of a command other than train (None: it has none)."""
    from onestep import config

    return {"sample": config.SampleConfig, "export": config.ExportConfig, "bench": config.BenchConfig,
            "runs": getattr(config, "RunsConfig", None), "eval": config.EvalRunConfig,
            "cache": config.CacheConfig}.get(command)


def schema_help(command: str) -> str:
    """`onestep sample|export|bench|runs|eval --help`: the command's keys with defaults and doc comments."""
    cls = command_schema(command)
    lines = [f"onestep {command}: {COMMANDS[command]}", ""]
    if cls is None:
        return "\n".join(lines)
    docs = field_docs(cls)
    prefix = "bench." if command == "bench" else ""
    for f in dataclasses.fields(cls):
        lines.append(_line(f"  {prefix}{f.name}", field_default(f), docs.get(f.name, "")))
    if command == "bench":
        lines += ["", "plus any `onestep train` key (experiment=..., eval.num_samples=...) for the protocol"]
    if command == "eval":
        lines += ["", "plus eval.<key>=value (eval.num_samples=..., eval.reference=...): the run's eval section, changed"]
    if command == "cache":
        lines += ["", "plus the `onestep train` keys naming the teacher and data (experiment=..., teacher.path=..., "
                  "data=..., data.path=...)"]
    return "\n".join(lines)


# --- train --help -----------------------------------------------------------------------------------------------

def applies(section: str, name: str, cfg: DictConfig, trains_critic: bool) -> bool:
    """Whether ``section.name`` is read by the run ``cfg`` describes."""
    if section in ("teacher", "eval", "generator"):  # the teacher family says which of its fields it reads
        return teachers.reads(cfg.teacher.kind, section, name)
    if section == "data":
        return cfg.data.kind in DATA_FIELDS.get(name, (cfg.data.kind,))
    if section == "critic":
        return trains_critic
    return True


def train_help(cfg: DictConfig, experiment: str, trains_critic: bool) -> str:
    """The keys the composed run reads, section by section, with their values and doc comments."""
    desc = experiments().get(experiment, "")
    lines = [f"onestep train experiment={experiment}" + (f": {desc}" if desc else ""), "",
             f"teacher.kind={cfg.teacher.kind}, objective={cfg.objective.name}, data.kind={cfg.data.kind}; "
             "set any key below with key=value (keys of other teachers / data kinds are not shown)"]
    for section in SECTIONS:
        node = cfg[section]
        cls = schema(node)
        if section == "critic" and not trains_critic:
            continue
        head = field_docs(cls).get("", "") if cls else ""
        lines += ["", f"{section}:" + (f"  # {head}" if head else "")]
        lines += _node_lines(section, node, cfg, trains_critic, indent="  ")
    lines += ["", "top level:"]
    for name in ("seed", "out_root", "run_dir"):
        doc = field_docs(schema(cfg)).get(name, "")
        lines.append(_line(f"  {name}", cfg[name], doc))
    return "\n".join(lines)


def _node_lines(section: str, node: DictConfig, cfg: DictConfig, trains_critic: bool, indent: str) -> list[str]:
    docs = field_docs(schema(node)) if schema(node) else {}
    out = []
    for name in node:
        if indent == "  " and not applies(section, name, cfg, trains_critic):
            continue
        value = node[name] if not OmegaConf.is_missing(node, name) else "???"
        if schema(value) is not None:
            out.append(f"{indent}{name}:" + (f"  # {docs[name]}" if docs.get(name) else ""))
            out += _node_lines(section, value, cfg, trains_critic, indent + "  ")
        else:
            out.append(_line(f"{indent}{name}", value, docs.get(name, "")))
    return out


def _line(key: str, value, doc: str, width: int = 118) -> str:
    """``key = value   # doc``, the doc wrapped into its column."""
    v = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    text = f"{key} = {v}"
    if not doc:
        return text
    column = max(46, len(text) + 2)
    wrapped = textwrap.wrap(doc, max(30, width - column - 2))
    return "\n".join([f"{text:<{column}}# {wrapped[0]}"] + [f"{'':<{column}}# {w}" for w in wrapped[1:]])
