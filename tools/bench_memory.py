"""Peak memory and time per step of an `sd15_dmd2` run on the real SD1.5 UNet architecture (random weights,
built from its config, 860M parameters), for the memory options.

    python tools/bench_memory.py                      # all rows; writes results/sd_memory_<device>.{json,md}
    python tools/bench_memory.py --resolution 256     # image side in pixels (latents = side / 8)
    python tools/bench_memory.py render               # rewrite results/*memory*.md from their JSON, running nothing
    python tools/bench_memory.py wan                  # Wan 2.1 / 2.2 video teachers: meta-device parameter counts
                                                      # only (nothing runs); writes results/wan_memory.{json,md}
    python tools/bench_memory.py checkpoint [--width 0.5]   # peak memory per process while saving / resuming a
                                                      # 2-process FSDP run, gathered safetensors vs dcp; writes
                                                      # results/checkpoint_memory.{json,md}

Each row is a separate `onestep train experiment=sd15_dmd2 ...` in a fresh process (so peaks do not mix),
3 steps, timed and measured from the end of step 1 to the end of step 3 (steady state: the transient of
loading the pipeline is excluded). Peak = the process's RSS high-water mark (VmHWM, reset after step 1) on CPU,
torch.cuda.max_memory_allocated on GPU. The pipeline folder holds the random SD1.5 UNet plus a small VAE and
a one-layer 768-wide CLIP text encoder (they only encode prompts and decode the final grid). On a CPU machine
runs that cannot fit in its RAM are not started; their size is estimated from parameter counts instead.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

#: (label, overrides); every row: objective.ttur=1 so that a step is one critic + one generator update
ROWS = [
    ("full fine-tune, fp32 frozen", ["trainer.frozen_dtype=fp32", "trainer.gradient_checkpointing=false"]),
    ("full fine-tune, bf16 frozen, grad ckpt", ["trainer.frozen_dtype=bf16", "trainer.gradient_checkpointing=true"]),
    ("LoRA-64, fp32 frozen", ["generator.lora.rank=64", "critic.lora.rank=64", "trainer.frozen_dtype=fp32",
                              "trainer.gradient_checkpointing=false"]),
    ("LoRA-64, bf16 frozen", ["generator.lora.rank=64", "critic.lora.rank=64", "trainer.frozen_dtype=bf16",
                              "trainer.gradient_checkpointing=false"]),
    ("LoRA-64, bf16 frozen, grad ckpt", ["generator.lora.rank=64", "critic.lora.rank=64",
                                         "trainer.frozen_dtype=bf16", "trainer.gradient_checkpointing=true"]),
]
UNET_PARAMS = None  # filled in by build()


def build(folder: Path, width: float = 1.0) -> int:
    """The SD1.5-architecture pipeline folder (random weights; ``width`` scales every block's channels);
    returns the UNet's parameter count."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from sd_fixtures import TOKENS, scheduler, tokenizer, vae

    torch.manual_seed(0)
    # runwayml/stable-diffusion-v1-5 unet/config.json: the diffusers defaults but for these two keys
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768,
                                block_out_channels=tuple(int(c * width) for c in (320, 640, 1280, 1280)))
    if not (folder / "model_index.json").is_file():
        text = CLIPTextModel(CLIPTextConfig(hidden_size=768, num_hidden_layers=1, num_attention_heads=12,
                                            intermediate_size=768, max_position_embeddings=16,
                                            vocab_size=len(TOKENS), bos_token_id=len(TOKENS) - 2,
                                            eos_token_id=len(TOKENS) - 1, pad_token_id=len(TOKENS) - 1))
        pipe = StableDiffusionPipeline(unet=unet, vae=vae(), text_encoder=text, tokenizer=tokenizer(folder / "_tok"),
                                       scheduler=scheduler(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
        pipe.save_pretrained(str(folder))
    return sum(p.numel() for p in unet.parameters())


def estimate_gib(params: int, label: str) -> float:
    """Weights + grads + Adam moments of the trained copies, plus the frozen teacher (activations excluded)."""
    frozen = 2 if "bf16" in label else 4
    if "LoRA" in label:
        return params * frozen / 2**30
    trained = 2 * params * 4 * 4  # generator and critic, fp32: weights, grads, Adam m and v
    return (params * frozen + trained) / 2**30


#: SDXL base's UNet (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json), the keys that differ from defaults
SDXL_UNET = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
ATTN = ("to_q", "to_k", "to_v", "to_out.0")


def counts(config: dict, rank: int = 64) -> tuple[int, int]:
    """(UNet parameters, LoRA-``rank`` adapter parameters on the attention projections), on the meta device."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    lora = sum(rank * (m.in_features + m.out_features) for n, m in unet.named_modules()
               if isinstance(m, torch.nn.Linear) and n.endswith(ATTN))
    return sum(p.numel() for p in unet.parameters()), lora


def estimates() -> list[dict]:
    """Weights + gradients + Adam moments of a DMD2 run (teacher, generator, critic), activations excluded."""
    out = []
    for name, config in (("SD1.5", {"cross_attention_dim": 768}), ("SDXL", SDXL_UNET)):
        n, lora = counts(config)
        full = n * 2 + 2 * n * 4 * 4  # bf16 teacher; fp32 generator and critic with grads and Adam m, v
        low = n * 2 + 2 * lora * 4 * 4 + lora * 4  # one bf16 base; two fp32 adapters (+ grads, Adam), EMA adapter
        out.append({"model": name, "unet_params": n, "lora_params": lora, "full_bytes": full, "lora_bytes": low})
    return out


#: the published Wan transformer configs (Wan-AI/Wan2.1-T2V-1.3B-Diffusers, Wan-AI/Wan2.1-T2V-14B-Diffusers,
#: Wan-AI/Wan2.2-T2V-A14B-Diffusers transformer/config.json and, for A14B, transformer_2/config.json; the Wan report's
#: Table 1: hidden 1536 / 5120, layers 30 / 40, heads 12 / 40, FFN 8960 / 13824) as (experts, the keys that differ
#: from WanTransformer3DModel's defaults, whose other values (16 latent channels, UMT5 text_dim 4096, freq_dim 256,
#: patches (1, 2, 2), RMS q/k norm) are those configs'). Wan 2.2 A14B: two experts of the 14B shape.
WAN = {"Wan 2.1 T2V 1.3B": (1, dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30)),
       "Wan 2.1 T2V 14B": (1, dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40)),
       "Wan 2.2 T2V A14B": (2, dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40))}
#: the FSDP world size of the per-GPU column
FSDP_GPUS = 8


def wan_estimates(rank: int = 64) -> list[dict]:
    """Weights + gradients + Adam moments of a Wan DMD2 run (wan_dmd2 / wan22_dmd2: bf16 teacher, trained copies in
    fp32, no EMA), from meta-device models: the full form, whole and per GPU under FSDP over FSDP_GPUS (every
    parameter, gradient and moment sharded, onestep/fsdp.py), and the LoRA-``rank`` form (attention projections),
    which trains data-parallel."""
    from diffusers import WanTransformer3DModel

    out = []
    for name, (experts, config) in WAN.items():
        with torch.device("meta"):
            model = WanTransformer3DModel(**config)
        n = sum(p.numel() for p in model.parameters()) * experts
        lora = experts * sum(rank * (m.in_features + m.out_features) for k, m in model.named_modules()
                             if isinstance(m, torch.nn.Linear) and k.endswith(ATTN))
        full = n * 2 + 2 * n * 4 * 4  # bf16 teacher; fp32 generator and critic with grads and Adam m, v
        low = n * 2 + 2 * lora * 4 * 4  # one bf16 base; two fp32 adapters with grads and Adam m, v
        out.append({"model": name, "experts": experts, "hidden": config["num_attention_heads"] * config["attention_head_dim"],
                    "layers": config["num_layers"], "params": n, "lora_params": lora,
                    "full_bytes": full, "lora_bytes": low})
    return out


def render_wan(d: dict) -> str:
    """results/wan_memory.md from its JSON."""
    lines = ["# Wan video teachers: DMD2 memory from parameter counts", "",
             "Command: `python tools/bench_memory.py wan`", "",
             "Meta-device WanTransformer3DModel built from the published configs (nothing downloaded, nothing run): "
             "weights + gradients + Adam moments of a DMD2 run as configs/experiment/wan_dmd2.yaml and "
             "wan22_dmd2.yaml set it up (bf16 frozen teacher, generator and critic trained in fp32, AdamW, no EMA). "
             f"LoRA-{d['rank']}: adapters on the attention projections (to_q, to_k, to_v, to_out.0) of one shared bf16 "
             f"base. FSDP: every parameter, gradient and moment sharded over {d['gpus']} GPUs (onestep/fsdp.py); "
             "activations (which gradient checkpointing shrinks), the one block FSDP gathers at a time and the "
             "text encoder / VAE come on top. LoRA runs are data-parallel (trainer.fsdp refuses LoRA adapters: their "
             "trained state is small), so every GPU holds the whole LoRA figure.", "",
             f"| model | experts x (hidden, layers) | params | full: total | full: per GPU, FSDP x{d['gpus']} | "
             f"LoRA-{d['rank']}: per GPU (data parallel) |", "|---|---|---|---|---|---|"]
    for e in d["estimates"]:
        gib = [e["full_bytes"] / 2**30, e["lora_bytes"] / 2**30]
        lines.append(f"| {e['model']} | {e['experts']} x ({e['hidden']}, {e['layers']}) | {e['params'] / 1e9:.2f} B | "
                     f"{gib[0]:.1f} GiB | {gib[0] / d['gpus']:.1f} GiB | {gib[1]:.1f} GiB "
                     f"({e['lora_params'] / 1e6:.1f} M adapter params each) |")
    return "\n".join(lines) + "\n"


def write_wan() -> None:
    data = {"rank": 64, "gpus": FSDP_GPUS, "estimates": wan_estimates()}
    (ROOT / "results" / "wan_memory.json").write_text(json.dumps(data, indent=1) + "\n")
    text = render_wan(data)
    (ROOT / "results" / "wan_memory.md").write_text(text)
    print(text)


def one(args) -> None:
    """Child process: run the configured training and print {"peak_gib", "s_per_step"} as the last line."""
    from hydra import compose, initialize_config_module

    import onestep.config  # noqa: F401  (registers the schemas)
    import onestep.objectives  # noqa: F401
    from onestep.train.trainer import train

    with initialize_config_module("onestep.configs", version_base="1.3"):
        cfg = compose("config", overrides=json.loads(args.one))
    marks = {}
    cuda = torch.cuda.is_available()

    def mark(step, logs):
        if cuda:
            torch.cuda.synchronize()
        marks[step] = time.perf_counter()
        if step == 1:  # steady state: forget the peak of loading the pipeline and of the first step
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            else:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the RSS high-water mark
        if step == 3:
            marks["peak"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else _vm_hwm_gib()

    train(cfg, cfg.run_dir, callbacks=(mark,))
    print(json.dumps({"peak_gib": marks["peak"], "s_per_step": (marks[3] - marks[1]) / 2}))


#: the phases the checkpoint rows measure: the trainer function each one runs in
CKPT_PHASES = {"save": "_save", "resume": "resume_state"}


def checkpoint_child(args) -> None:
    """One process of a `torchrun` launch: train with trainer._save / trainer.resume_state wrapped so that each call
    records the process's resident memory before it and the RSS high-water mark during it (VmHWM, reset at entry);
    writes <run_dir>/memory_rank<r>.json."""
    import torch.distributed as dist
    from hydra import compose, initialize_config_module

    import onestep.config  # noqa: F401  (registers the schemas)
    import onestep.objectives  # noqa: F401
    from onestep.train import trainer

    records: dict[str, list[dict]] = {}

    def probed(phase, fn):
        def wrapper(*a, **k):
            before = _status_gib("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")
            t0 = time.perf_counter()
            out = fn(*a, **k)
            records.setdefault(phase, []).append({"rss_before_gib": before, "peak_gib": _vm_hwm_gib(),
                                                  "s": time.perf_counter() - t0})
            return out
        return wrapper

    for phase, name in CKPT_PHASES.items():
        setattr(trainer, name, probed(phase, getattr(trainer, name)))
    with initialize_config_module("onestep.configs", version_base="1.3"):
        cfg = compose("config", overrides=json.loads(args.checkpoint_child))
    trainer.train(cfg, cfg.run_dir)
    rank = dist.get_rank() if dist.is_initialized() else 0
    (Path(cfg.run_dir) / f"memory_rank{rank}.json").write_text(json.dumps(records))


def write_checkpoint_memory(width: float, work: Path) -> None:
    """Two runs per format on 2 gloo processes (FSDP2, sd15_dmd2 on the SD1.5 layout at ``width``): 1 step that
    saves its checkpoint, then the same run to step 2, which resumes from it (and saves again)."""
    import shutil

    folder = work / f"sd15_width{width}"
    params = build(folder, width)
    prompts = work / "prompts.txt"
    prompts.write_text("a photo of a cat\na red car on a road\nan oil painting of a harbour\n")
    rows = []
    for fmt in ("safetensors", "dcp"):
        run_dir = work / "runs" / f"ckpt_{fmt}"
        shutil.rmtree(run_dir, ignore_errors=True)
        ov = ["experiment=sd15_dmd2", f"teacher.path={folder}", f"data.path={prompts}", "teacher.resolution=64",
              "objective.ttur=1", "trainer.batch_size=2", "trainer.fsdp=true", f"trainer.checkpoint_format={fmt}",
              "trainer.checkpoint_every=1", "trainer.sample_every=0", "trainer.progress=false",
              "eval.num_samples=1", "eval.teacher_steps=[1]", "eval.plot=false", f"out_root={work}",
              f"run_dir={run_dir}"]
        ranks: dict[int, dict] = {}
        for steps, phase in ((1, "save"), (2, "resume")):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", __file__,
                   "--checkpoint-child", json.dumps([*ov, f"trainer.steps={steps}"])]
            t0 = time.perf_counter()
            r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            if r.returncode != 0:
                raise SystemExit(f"{fmt}, {steps} step(s) failed:\n{r.stderr[-3000:]}")
            for rank in (0, 1):
                rec = json.loads((run_dir / f"memory_rank{rank}.json").read_text())
                ranks.setdefault(rank, {})[phase] = rec[phase][0]  # (the first: step 2's own save comes after)
            print(f"{fmt}, {steps} step(s): {time.perf_counter() - t0:.0f} s", flush=True)
        ckpt = sorted((run_dir / "checkpoints").glob("step_*"))[0]
        size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
        rows += [{"format": fmt, "rank": rank, **{f"{ph}_{k}": v for ph, rec in r.items() for k, v in rec.items()},
                  "checkpoint_bytes": size} for rank, r in sorted(ranks.items())]
    data = {"unet_params": params, "full_unet_params": counts({"cross_attention_dim": 768})[0], "width": width,
            "processes": 2, "threads": 1, "rows": rows,
            "ram_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30}
    (ROOT / "results" / "checkpoint_memory.json").write_text(json.dumps(data, indent=1) + "\n")
    text = render_checkpoint(data)
    (ROOT / "results" / "checkpoint_memory.md").write_text(text)
    print(text)


def render_checkpoint(d: dict) -> str:
    full = d["full_unet_params"]
    lines = ["# Checkpoint memory: gathered safetensors vs sharded dcp", "",
             f"Command: `python tools/bench_memory.py checkpoint --width {d['width']}`", "",
             f"sd15_dmd2 (full fine-tune: generator and critic fp32 with AdamW, bf16 frozen teacher) under FSDP2 on "
             f"{d['processes']} gloo processes, {d['threads']} thread each, on the SD1.5 UNet layout with every block's "
             f"channels x {d['width']} ({d['unet_params'] / 1e6:.0f}M parameters, random weights; the real width, "
             f"{full / 1e6:.0f}M, would need the whole trained state, {full * 24 / 2**30:.0f} GiB, on the writing "
             f"process when gathered, beside both processes' shards: more than this machine's {d['ram_gib']:.0f} GiB). save: the trainer's checkpoint write at step 1; resume: reading "
             "that checkpoint back at the start of the next launch. Resident = the process's RSS when the phase "
             "starts; peak = its RSS high-water mark during the phase (VmHWM, reset at entry)." + (" " + d["note"] if d.get("note")
                                                                                    else ""), "",
             "| format | process | resident before save | peak while saving | save s | resident before resume | "
             "peak while resuming | resume s | checkpoint on disk |", "|---|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        lines.append(f"| {r['format']} | rank {r['rank']} | {r['save_rss_before_gib']:.2f} GiB | "
                     f"{r['save_peak_gib']:.2f} GiB | {r['save_s']:.1f} | {r['resume_rss_before_gib']:.2f} GiB | "
                     f"{r['resume_peak_gib']:.2f} GiB | {r['resume_s']:.1f} | {r['checkpoint_bytes'] / 2**30:.2f} GiB |")
    return "\n".join(lines) + "\n"


def _status_gib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: its high-water mark), in GiB."""
    line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(field))
    return int(line.split()[1]) / 2**20


def _vm_hwm_gib() -> float:
    return _status_gib("VmHWM")


def main() -> None:
    sys.path.insert(0, str(ROOT / "tools"))
    from readme_block import rerender

    if rerender(rendered):  # `render`: rewrite the markdown from its data, running nothing
        return
    if sys.argv[1:] == ["wan"]:
        return write_wan()
    if sys.argv[1:2] == ["checkpoint"]:
        cp = argparse.ArgumentParser(prog="bench_memory.py checkpoint")
        cp.add_argument("--width", type=float, default=0.5, help="scale of the SD1.5 UNet's channels")
        cp.add_argument("--work", default="runs/bench_checkpoint_memory")
        a = cp.parse_args(sys.argv[2:])
        return write_checkpoint_memory(a.width, Path(a.work))
    if sys.argv[1:2] == ["--checkpoint-child"]:
        return checkpoint_child(argparse.Namespace(checkpoint_child=sys.argv[2]))
    ap = argparse.ArgumentParser()
    ap.add_argument("--resolution", type=int, default=None, help="pixels (default: 512 on GPU, 128 on CPU)")
    ap.add_argument("--work", default="runs/bench_memory")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        return one(args)
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "cpu"
    res = args.resolution or (512 if cuda else 128)
    work = Path(args.work)
    folder = work / "sd15_random"
    params = build(folder)
    prompts = work / "prompts.txt"
    prompts.write_text("a photo of a cat\na red car on a road\nan oil painting of a harbour\n")
    ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    rows = []
    for label, overrides in ROWS:
        est = estimate_gib(params, label)
        if not cuda and est > 0.8 * ram_gib:
            rows.append({"label": label, "not_run_gib": est})
            print(f"{label}: skipped, needs >= {est:.1f} GiB", flush=True)
            continue
        run_dir = work / "runs" / label.replace(" ", "").replace(",", "_")
        ov = ["experiment=sd15_dmd2", f"teacher.path={folder}", f"data.path={prompts}", f"teacher.resolution={res}",
              "objective.ttur=1", "trainer.steps=3", "trainer.batch_size=1", "trainer.checkpoint_every=1000",
              "trainer.sample_every=0", "trainer.progress=false", "eval.num_samples=1", "eval.teacher_steps=[1]",
              "eval.plot=false", f"out_root={work}", f"run_dir={run_dir}", *overrides]
        if cuda:
            ov.append("trainer.mixed_precision=bf16")
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, __file__, "--one", json.dumps(ov)], capture_output=True, text=True)
        if r.returncode != 0:
            rows.append({"label": label, "failed": (r.stderr.strip().splitlines() or ["?"])[-1][:120]})
            print(f"{label}: failed\n{r.stderr[-2000:]}", flush=True)
            continue
        rows.append({"label": label, **json.loads(r.stdout.strip().splitlines()[-1])})
        print(f"{label}: {rows[-1]['peak_gib']:.2f} GiB, {rows[-1]['s_per_step']:.1f} s/step "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)

    data = {"device": device, "cuda": cuda, "resolution": res, "resolution_given": args.resolution is not None,
            "unet_params": params, "threads": torch.get_num_threads(), "ram_gib": ram_gib, "rows": rows,
            "estimates": estimates()}
    name = f"sd_memory_{'gpu' if cuda else 'cpu'}"
    (ROOT / "results" / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    text = rendered(ROOT / "results")[f"{name}.md"]
    (ROOT / "results" / f"{name}.md").write_text(text)
    print(text)
    sys.path.insert(0, str(ROOT / "tools"))
    from readme_block import update_readme

    print("README block updated" if update_readme(f"results/{name}.md") else f"README has no block for {name}.md")


def render(d: dict) -> str:
    """results/sd_memory_<device>.md from its JSON: the measured rows, then the estimates from parameter counts."""
    res, cuda = d["resolution"], d["cuda"]
    lines = [f"# sd15_dmd2 memory and speed ({d['device']})", "",
             f"Command: `python tools/bench_memory.py{' --resolution ' + str(res) if d['resolution_given'] else ''}`", "",
             f"SD1.5 UNet architecture ({d['unet_params'] / 1e6:.0f}M parameters, random weights), {res}x{res} px "
             f"({res // 8}x{res // 8} latents), batch 1, objective.ttur=1 (one critic + one generator update per "
             f"step), {'bf16 autocast' if cuda else str(d['threads']) + ' CPU threads'}; trained weights in fp32, a "
             f"bf16 frozen UNet runs under autocast. Peak: "
             f"{'torch.cuda.max_memory_allocated' if cuda else 'process RSS high-water mark'} over steps 2-3. "
             f"Attention: PyTorch SDPA{'' if cuda else ' (xformers has no CPU kernels)'}.", "",
             "| configuration | peak memory | s / step |", "|---|---|---|"]
    for r in d["rows"]:
        if "not_run_gib" in r:
            cells = (f"not run (≥ {r['not_run_gib']:.1f} GiB of weights + optimizer state; RAM "
                     f"{d['ram_gib']:.0f} GiB)", "")
        elif "failed" in r:
            cells = (f"failed: {r['failed']}", "")
        else:
            cells = (f"{r['peak_gib']:.2f} GiB", f"{r['s_per_step']:.1f}")
        lines.append(f"| {r['label']} | {cells[0]} | {cells[1]} |")
    lines += ["", "Weights + gradients + Adam moments of a DMD2 run, from parameter counts (meta-device models; "
              "activations, which gradient checkpointing shrinks, come on top):", "",
              "| model | UNet params | full fine-tune, bf16 teacher | LoRA-64 generator + critic, bf16 base |",
              "|---|---|---|---|"]
    for e in d["estimates"]:
        lines.append(f"| {e['model']} | {e['unet_params'] / 1e9:.2f} B | {e['full_bytes'] / 2**30:.1f} GiB | "
                     f"{e['lora_bytes'] / 2**30:.1f} GiB ({e['lora_params'] / 1e6:.1f} M adapter params each) |")
    return "\n".join(lines) + "\n"


def rendered(folder: Path) -> dict[str, str]:
    """The markdown this tool writes, rendered from the sd_memory_*.json and wan_memory.json in ``folder`` alone."""
    out = {f.with_suffix(".md").name: render(json.loads(f.read_text())) for f in sorted(folder.glob("sd_memory_*.json"))}
    ckpt = folder / "checkpoint_memory.json"
    if ckpt.is_file():
        out[ckpt.with_suffix(".md").name] = render_checkpoint(json.loads(ckpt.read_text()))
    wan = folder / "wan_memory.json"
    if wan.is_file():
        out[wan.with_suffix(".md").name] = render_wan(json.loads(wan.read_text()))
    return out


if __name__ == "__main__":
    main()
