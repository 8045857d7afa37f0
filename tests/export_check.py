"""Run exports in a fresh interpreter in which ``import onestep`` fails: plain diffusers only, as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

#: run in a fresh interpreter with onestep made unimportable: load each export as its onestep_export.json says,
#: generate with the documented call, save the images
CLEAN = r'''
import json, sys
sys.modules["onestep"] = None  # any import of onestep now raises ImportError
try:
    import onestep  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("onestep is importable in the clean process")
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file

for job in json.loads(sys.argv[1]):
    folder = job["folder"]
    info = json.load(open(folder + "/onestep_export.json"))
    if job.get("single_file"):
        import diffusers
        cls = getattr(diffusers, info["pipeline_class"])
        pipe = cls.from_single_file(folder + "/" + info["single_file"], config=folder, local_files_only=True)
    else:
        pipe = DiffusionPipeline.from_pretrained(folder, **({"custom_pipeline": folder, "trust_remote_code": True} if info.get("custom_pipeline") else {}))
    if info.get("lora"):
        pipe.load_lora_weights(folder)
    call = dict(info["call"])
    if info["prompted"]:
        call["prompt"] = [job["prompt"]] * job["n"]
    else:
        call["batch_size"] = job["n"]
    if info.get("reseed_global"):
        torch.manual_seed(job["seed"])
    out = pipe(**call, generator=torch.Generator("cpu").manual_seed(job["seed"]), output_type="pt")
    # video pipelines: frames (n, F, C, H, W) -> (n, C, F, H, W), as onestep sample returns them
    images = out.frames.transpose(1, 2) if hasattr(out, "frames") else out.images
    save_file({"images": images.float().contiguous()}, job["out"])
'''


def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def clean_process(jobs: list[dict], cwd: Path) -> list[torch.Tensor]:
    r = subprocess.run([sys.executable, "-c", CLEAN, json.dumps(jobs)], cwd=cwd, env=env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return [load_file(j["out"])["images"] for j in jobs]


