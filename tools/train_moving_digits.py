"""Train the shipped text-to-video moving-digits teacher: a Wan 2.1-shaped pipeline on moving digits.

    python tools/train_moving_digits.py [--out FOLDER] [--vae-steps N] [--dit-steps N] [--threads 2]
    python tools/train_moving_digits.py --eval-only      # re-measure the quality of an existing folder
    python tools/train_moving_digits.py --vae-from F     # keep F's VAE, train text encoder + transformer again
    python tools/train_moving_digits.py --set dit.num_layers=6 dit_train.lr=5e-4   # try other sizes / settings

Every part is the Wan 2.1 part in miniature, so the folder loads with ``diffusers.WanPipeline.from_pretrained``
(call it with height=16, width=16, num_frames=9, max_sequence_length=MAX_TOKENS):
  tokenizer     a T5TokenizerFast (Unigram, built with ``tokenizers``) whose vocabulary holds every caption word
                as one piece and every character alone, so any prompt tokenizes
  text_encoder  a tiny UMT5EncoderModel, trained jointly with the transformer (Wan froze a pretrained umT5; none
                is this small, so this one learns the captions)
  vae           an AutoencoderKLWan, (1, 9, 16, 16) videos <-> (4, 5, 8, 8) latents (causal 3D convolutions, 2x
                in time and space), trained first on reconstruction from the posterior mean + a small KL (encode
                with ``latent_dist.mean``); latents_mean / latents_std are
                the per-channel statistics of the training latents (the pipeline decodes latents * std + mean)
  transformer   a WanTransformer3DModel (patch (1, 2, 2): 80 tokens) with cross-attention on the text embeddings
  scheduler     FlowMatchEulerDiscreteScheduler with shift SHIFT
Transformer objective, rectified flow matching (Liu et al. 2023; Esser et al. 2024, eq. (1) and Sec. 3.1):
x_t = (1 - t) z + t eps, target v = eps - z, loss || v - v_theta(x_t, 1000 t, c) ||^2, t drawn from the
logit-normal (ibid., Sec. 3.1, m = 0, s = 1) and shifted like the sampler's sigmas, t -> SHIFT t / (1 + (SHIFT - 1) t)
(ibid., eq. (23)), so training sees the noise levels sampling visits. z is the normalised VAE latent (posterior
mean) of a training video, c its caption from TRAIN_TEMPLATES, replaced by "" with probability 0.1 (the
pipeline's unconditional branch, for classifier-free guidance). Text embeddings are made as WanPipeline makes them:
padded to MAX_TOKENS, positions past the prompt zeroed. Half the captions get 1-3 made-up single-character words
inserted so the encoder reads digit and direction whatever words surround them (held-out templates use words the
encoder never saw; tools/train_digits_t2i.py found the same). AdamW, warmup + cosine decay, gradient clipping,
EMA of transformer and text encoder (the EMA ships). Deterministic for a given seed and thread count.

The folder also holds prompts_train.txt / prompts_heldout.txt, samples.gif (held-out prompts) and onestep.json:
the configs, timings and the measured quality of the guided pipeline at QUALITY_STEPS on held-out prompts (and
training prompts at the most steps): per-frame FD, prompt accuracy and temporal consistency
(onestep.eval.moving_digits_eval), plus the floor that real videos through the VAE reach.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from onestep.data.moving_digits import CANVAS, DIRECTIONS, FRAMES, HELDOUT_TEMPLATES, TRAIN_TEMPLATES, WORDS, \
    caption, draw, moving_digits, write_prompt_files
from onestep.progress import bar

ASSET = Path(__file__).resolve().parent.parent / "onestep" / "assets" / "moving_digits"
META_FILE = "onestep.json"
MAX_TOKENS = 16
SHIFT = 3.0  # Wan 2.1 T2V's flow_shift at 480p
VAE = {"base_dim": 8, "z_dim": 4, "dim_mult": [1, 2], "num_res_blocks": 1, "temperal_downsample": [True],
       "in_channels": 1, "out_channels": 1, "scale_factor_temporal": 2, "scale_factor_spatial": 2}
DIT = {"patch_size": [1, 2, 2], "num_attention_heads": 4, "attention_head_dim": 16, "in_channels": 4,
       "out_channels": 4, "text_dim": 32, "freq_dim": 64, "ffn_dim": 128, "num_layers": 4, "rope_max_seq_len": 64}
TEXT = {"d_model": 32, "d_kv": 16, "d_ff": 64, "num_layers": 2, "num_heads": 2, "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": MAX_TOKENS, "feed_forward_proj": "gated-gelu"}
VAE_TRAIN = {"steps": 1200, "batch": 16, "lr": 2e-3, "warmup": 30, "kl_weight": 1e-5, "seed": 0}
DIT_TRAIN = {"steps": 8000, "batch": 64, "videos": 10000, "lr": 1e-3, "warmup": 100, "weight_decay": 0.0, "ema_decay": 0.999,
             "caption_dropout": 0.1, "junk_prob": 0.5, "junk_max": 3, "grad_clip": 1.0, "seed": 0}
GUIDANCE = 3.0
QUALITY_STEPS = (1, 4, 32)
QUALITY_SAMPLES = 600
QUALITY_SEED = 12345
SAMPLE_BATCH = 300
#: the videos whose latents give latents_mean / latents_std
STATS_VIDEOS = 2000
GIF_PROMPTS = 16


#: what --set SECTION.KEY=VALUE changes
SECTIONS = {"vae": VAE, "dit": DIT, "text": TEXT, "vae_train": VAE_TRAIN, "dit_train": DIT_TRAIN}


def apply_settings(settings: list[str]) -> None:
    """--set SECTION.KEY=VALUE (VALUE read as JSON, else a string) into the module's tables, before anything is
    built, so onestep.json records what was trained."""
    for item in settings:
        key, sep, value = item.partition("=")
        section, _, name = key.partition(".")
        if not sep or section not in SECTIONS or name not in SECTIONS[section]:
            known = ", ".join(f"{s}.{k}" for s, table in SECTIONS.items() for k in table)
            raise SystemExit(f"--set '{item}': expected SECTION.KEY=VALUE with one of {known}")
        try:
            SECTIONS[section][name] = json.loads(value)
        except json.JSONDecodeError:
            SECTIONS[section][name] = value


def lr_lambda(warmup: int, steps: int):
    """Linear warmup, then cosine decay to 0 over the run."""
    return lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * i / steps))


def tokenizer_files(folder: Path):
    """A T5TokenizerFast in ``folder``: T5's <pad> = 0, </s> = 1, <unk> = 2, every caption word as one word-initial
    piece ("▁three"), every printable character alone and word-initial (any prompt tokenizes)."""
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(33, 127)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in WORDS] + [(c, -3.0) for c in chars]
    pieces += [("▁" + c, -2.5) for c in chars if c not in WORDS]
    T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=MAX_TOKENS).save_pretrained(str(folder))
    tok = T5TokenizerFast.from_pretrained(str(folder))
    for word in [*WORDS, *map(str, range(10))]:
        ids = tok(word).input_ids
        if len(ids) != 2:
            raise RuntimeError(f"the moving-digits tokenizer splits '{word}' into {tok.convert_ids_to_tokens(ids)}")
    return tok


def text_encoder(tok):
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(**TEXT, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                       eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id))


def embed(te, ids: torch.Tensor) -> torch.Tensor:
    """WanPipeline's prompt embeddings: the encoder's last hidden state, zero past each prompt's tokens."""
    mask = (ids != 0).long()
    return te(ids, mask).last_hidden_state * mask[..., None]


def scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=SHIFT)


def train_vae(digits: torch.Tensor, cfg: dict):
    """Reconstruction (L1 + L2) from the posterior mean + kl_weight KL(q(z|x) || N(0, I)) on freshly drawn videos;
    then latents_mean / latents_std; returns (vae, info). The mean, not a sample: with the few hundred steps this
    budget allows, the unit-variance noise of an untrained posterior drowns the signal and the decoder learns a blank
    canvas; every use of this VAE (training latents, the quality floor) encodes to the posterior mean."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(cfg["seed"])
    g = torch.Generator().manual_seed(cfg["seed"])
    vae = AutoencoderKLWan(**VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg["lr"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg["warmup"], cfg["steps"]))
    # decode() clamps to [-1, 1]: a decoder that puts ink below -1 gets no gradient there and stalls at a blank
    # canvas, so the loss reads the decoder's raw frames (what decode() concatenates before clamping)
    raw: list[torch.Tensor] = []
    hook = vae.decoder.register_forward_hook(lambda _m, _i, y: raw.append(y))
    pbar = bar(range(cfg["steps"]), desc="vae")
    for _ in pbar:
        x = draw(digits, cfg["batch"], g)[0]
        post = vae.encode(x).latent_dist
        raw.clear()
        vae.decode(post.mean)
        rec = torch.cat(raw, 2)
        # LDM's weighting: the KL summed over latent entries against the reconstruction summed over pixels, both
        # divided by the pixel count
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + cfg["kl_weight"] * post.kl().mean() / rec[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        pbar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    hook.remove()
    vae.eval().requires_grad_(False)
    videos = draw(digits, STATS_VIDEOS, g)[0]
    with torch.no_grad():
        mean = torch.cat([vae.encode(x).latent_dist.mean for x in videos.split(SAMPLE_BATCH)])
        recon = torch.cat([vae.decode(z).sample for z in mean.split(SAMPLE_BATCH)])
    mu, std = mean.mean((0, 2, 3, 4)), mean.std((0, 2, 3, 4))
    vae.register_to_config(latents_mean=[round(v, 6) for v in mu.tolist()],
                           latents_std=[round(v, 6) for v in std.tolist()])
    return vae, {"recon_mse": round(F.mse_loss(recon, videos).item(), 6),
                 "latents_mean": vae.config.latents_mean, "latents_std": vae.config.latents_std}


def normalise(vae, latents: torch.Tensor) -> torch.Tensor:
    """What the pipeline's decode inverts: (z - mean) / std per channel."""
    view = (1, -1, 1, 1, 1)
    return (latents - torch.tensor(vae.config.latents_mean).view(view)) / torch.tensor(vae.config.latents_std).view(view)


def train_dit(vae, digits: torch.Tensor, labels: torch.Tensor, tok, cfg: dict):
    """Rectified flow matching on a pool of cfg["videos"] training videos encoded once (the VAE costs more than
    the transformer step), the text encoder trained with the transformer; returns the EMAs."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(cfg["seed"])
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    videos, pool_idx, pool_dir = draw(digits, cfg["videos"], g)
    with torch.no_grad():
        pool = torch.cat([normalise(vae, vae.encode(x).latent_dist.mean)
                          for x in bar(videos.split(SAMPLE_BATCH), desc="encode videos", leave=False)])
    dit, te = WanTransformer3DModel(**DIT), text_encoder(tok)
    ema_dit, ema_te = copy.deepcopy(dit).requires_grad_(False), copy.deepcopy(te).requires_grad_(False)
    # every caption the run can draw, tokenized once: row (t * 4 + r) * 10 + d, the last row is ""
    table = [caption(d, r, t) for t in TRAIN_TEMPLATES for r in DIRECTIONS for d in range(10)] + [""]
    rows = [tok(c).input_ids for c in table]  # each ends with </s>
    junk = junk_tokens(tok)
    params = [*dit.parameters(), *te.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg["warmup"], cfg["steps"]))
    pbar = bar(range(cfg["steps"]), desc="transformer")
    for i in pbar:
        pick = torch.randint(0, len(pool), (cfg["batch"],), generator=g)
        z0, y, direction = pool[pick], labels[pool_idx[pick]], pool_dir[pick]
        row = (torch.randint(0, len(TRAIN_TEMPLATES), y.shape) * len(DIRECTIONS) + direction) * 10 + y
        row = torch.where(torch.rand(y.shape) < cfg["caption_dropout"], len(table) - 1, row)
        ids = padded([add_junk(rows[r], junk, cfg) for r in row.tolist()])
        t = shifted(torch.sigmoid(torch.randn(y.shape)))
        eps = torch.randn_like(z0)
        tb = t.view(-1, 1, 1, 1, 1)
        pred = dit(hidden_states=(1 - tb) * z0 + tb * eps, timestep=t * 1000, encoder_hidden_states=embed(te, ids),
                   return_dict=False)[0]
        loss = F.mse_loss(pred, eps - z0)
        if not torch.isfinite(loss):
            raise RuntimeError(f"transformer loss is {loss.item()} at step {i}; lower the lr or check the latents")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
        opt.step()
        sched.step()
        _ema_update([ema_dit, ema_te], [dit, te], min(cfg["ema_decay"], (1 + i) / (10 + i)))
        pbar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return ema_dit.eval(), ema_te.eval()


def shifted(t: torch.Tensor) -> torch.Tensor:
    """The scheduler's shift of a noise level (Esser et al. 2024, eq. (23))."""
    return SHIFT * t / (1 + (SHIFT - 1) * t)


def junk_tokens(tok) -> torch.Tensor:
    """Ids of the single-character word-initial pieces that name no digit: the made-up words of ``add_junk``."""
    return torch.tensor(sorted(i for p, i in tok.get_vocab().items()
                               if p.startswith("▁") and len(p) == 2 and not p[1].isdigit()))


def add_junk(ids: list[int], junk: torch.Tensor, cfg: dict) -> list[int]:
    """With probability junk_prob, 1..junk_max random junk tokens inserted at random places before </s>."""
    words, end = ids[:-1], ids[-1:]
    room = min(cfg["junk_max"], MAX_TOKENS - len(ids))
    if not words or room < 1 or float(torch.rand(())) >= cfg["junk_prob"]:  # "" stays the unconditional branch
        return ids
    words = list(words)
    for _ in range(int(torch.randint(1, room + 1, ()))):
        words.insert(int(torch.randint(0, len(words) + 1, ())), int(junk[torch.randint(0, len(junk), ())]))
    return words + end


def padded(rows: list[list[int]]) -> torch.Tensor:
    out = torch.zeros(len(rows), MAX_TOKENS, dtype=torch.long)
    for b, r in enumerate(rows):
        out[b, :len(r)] = torch.tensor(r[:MAX_TOKENS])
    return out


@torch.no_grad()
def _ema_update(emas, nets, decay: float) -> None:
    for ema, net in zip(emas, nets):
        for pe, p in zip(ema.parameters(), net.parameters()):
            pe.lerp_(p, 1 - decay)


def train(out: Path, vae_steps: int, dit_steps: int, threads: int, vae_from: Path | None = None) -> dict:
    from diffusers import WanPipeline

    from onestep.data.digits import load_digits_tensors

    digits, labels = load_digits_tensors("train", 8)
    vae_cfg, dit_cfg = VAE_TRAIN | {"steps": vae_steps}, DIT_TRAIN | {"steps": dit_steps}
    t0 = time.perf_counter()
    if vae_from is None:
        vae, vae_info = train_vae(digits, vae_cfg)
    else:  # retrain the transformer on a VAE this tool trained before (its training record travels with it)
        from diffusers import AutoencoderKLWan

        vae = AutoencoderKLWan.from_pretrained(str(vae_from / "vae")).eval().requires_grad_(False)
        old = json.loads((vae_from / META_FILE).read_text())
        vae_cfg = old["vae_training"] | {"from": str(vae_from), "seconds": old["train_seconds"]["vae"]}
        vae_info = {"recon_mse": vae_cfg["recon_mse"]}
    t1 = time.perf_counter()
    print(f"vae: reconstruction MSE {vae_info['recon_mse']} ({t1 - t0:.0f} s)", flush=True)
    if out.exists():
        shutil.rmtree(out)
    tok = tokenizer_files(out / "tokenizer")
    dit, te = train_dit(vae, digits, labels, tok, dit_cfg)
    t2 = time.perf_counter()
    print(f"transformer + text encoder: {t2 - t1:.0f} s", flush=True)
    pipe = WanPipeline(tokenizer=tok, text_encoder=te, vae=vae, transformer=dit, scheduler=scheduler())
    pipe.save_pretrained(str(out), safe_serialization=True)
    write_prompt_files(out)
    info = {"tool": "tools/train_moving_digits.py", "vae": VAE, "transformer": DIT, "text_encoder": TEXT,
            "scheduler": {"class": "FlowMatchEulerDiscreteScheduler", "shift": SHIFT},
            "max_sequence_length": MAX_TOKENS, "video": {"num_frames": FRAMES, "height": CANVAS, "width": CANVAS},
            "vae_training": vae_cfg | vae_info, "transformer_training": dit_cfg, "threads": threads,
            "train_seconds": {"vae": round(t1 - t0, 1), "transformer": round(t2 - t1, 1), "total": round(t2 - t0, 1)}}
    (out / META_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


def pipeline_videos(pipe, prompts: list[str], noise: torch.Tensor, steps: int, guidance: float) -> torch.Tensor:
    """WanPipeline's own sampling, (N, 1, F, H, W) in [-1, 1]."""
    out = pipe(prompt=prompts, height=CANVAS, width=CANVAS, num_frames=FRAMES, num_inference_steps=steps,
               guidance_scale=guidance, latents=noise, max_sequence_length=MAX_TOKENS, output_type="pt").frames
    return out.permute(0, 2, 1, 3, 4) * 2 - 1  # postprocess_video gives (N, F, C, H, W) in [0, 1]


@torch.no_grad()
def quality(folder: Path, guidance: float = GUIDANCE, samples: int = QUALITY_SAMPLES) -> dict:
    """Per-frame FD, prompt accuracy and temporal consistency of the guided pipeline's videos for held-out prompts
    (uniform digits, directions and templates), through diffusers' WanPipeline; writes samples.gif."""
    from diffusers import WanPipeline

    from onestep.data.video import write_video
    from onestep.eval.moving_digits_eval import MovingDigitsMetrics

    pipe = WanPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    metrics = MovingDigitsMetrics()
    g = torch.Generator().manual_seed(QUALITY_SEED)
    noise = torch.randn(samples, *latent_shape(pipe), generator=g)
    digits = torch.randint(0, 10, (samples,), generator=g).tolist()
    directions = torch.randint(0, len(DIRECTIONS), (samples,), generator=g).tolist()
    pick = torch.randint(0, 1 << 30, (samples,), generator=g).tolist()
    split_prompts = {split: [caption(d, DIRECTIONS[r], templates[i % len(templates)])
                             for d, r, i in zip(digits, directions, pick)]
                     for split, templates in (("heldout", HELDOUT_TEMPLATES), ("train", TRAIN_TEMPLATES))}
    # the floor the transformer cannot beat: real held-out-digit videos through the VAE (posterior mean)
    real, _, _ = moving_digits("heldout", samples, QUALITY_SEED)
    recon = torch.cat([pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
                       for x in real.split(SAMPLE_BATCH)])
    real_prompts = [caption(d, DIRECTIONS[r], HELDOUT_TEMPLATES[0]) for d, r in zip(*moving_digits(
        "heldout", samples, QUALITY_SEED)[1:])]
    out = {"samples": samples, "prompts": "uniform digits, directions and templates", "guidance": guidance,
           "sampler": "WanPipeline, FlowMatchEulerDiscreteScheduler", "metrics": "onestep.eval.moving_digits_eval",
           "real_videos": _rounded(metrics(real, real_prompts)), "vae_floor": _rounded(metrics(recon, real_prompts))}
    runs = [("heldout", steps) for steps in QUALITY_STEPS] + [("train", QUALITY_STEPS[-1])]
    for split, steps in runs:
        prompts = split_prompts[split]
        videos = torch.cat([pipeline_videos(pipe, prompts[i:i + SAMPLE_BATCH], noise[i:i + SAMPLE_BATCH], steps,
                                            guidance)
                            for i in bar(range(0, samples, SAMPLE_BATCH), desc=f"{split} {steps}-step",
                                         leave=False)])
        key = f"{steps}_step" + ("" if split == "heldout" else "_train_prompts")
        out[key] = _rounded(metrics(videos, prompts))
        if split == "heldout" and steps == QUALITY_STEPS[-1]:
            write_video(folder / "samples.gif", videos[:GIF_PROMPTS])
    return out


def latent_shape(pipe) -> tuple[int, ...]:
    vae = pipe.vae.config
    return (pipe.transformer.config.in_channels, (FRAMES - 1) // vae.scale_factor_temporal + 1,
            CANVAS // vae.scale_factor_spatial, CANVAS // vae.scale_factor_spatial)


def _rounded(m: dict) -> dict:
    keep = ("fd", "prompt_acc", "digit_acc", "direction_acc", "frame_digit_acc", "temporal_consistency")
    return {k: round(m[k], 4) for k in keep}


def print_table(q: dict) -> None:
    print(f"\n{q['samples']} videos per row, guidance {q['guidance']}")
    print(f"{'what':>22} {'FD':>8} {'prompt':>7} {'digit':>6} {'dir':>6} {'consist':>8}")
    for key, r in q.items():
        if isinstance(r, dict) and "fd" in r:
            print(f"{key:>22} {r['fd']:>8.3f} {r['prompt_acc']:>7.3f} {r['digit_acc']:>6.3f} "
                  f"{r['direction_acc']:>6.3f} {r['temporal_consistency']:>8.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ASSET))
    p.add_argument("--vae-steps", type=int, default=VAE_TRAIN["steps"])
    p.add_argument("--dit-steps", type=int, default=DIT_TRAIN["steps"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--guidance", type=float, default=GUIDANCE)
    p.add_argument("--quality-samples", type=int, default=QUALITY_SAMPLES, help="videos per quality row")
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--vae-from", help="a folder this tool wrote: reuse its VAE, train only text encoder + transformer")
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                   help=f"change a size or training setting ({', '.join(SECTIONS)})")
    a = p.parse_args()
    apply_settings(a.set)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    if a.eval_only:
        if not (out / META_FILE).is_file():
            raise SystemExit(f"--eval-only: '{out}' has no {META_FILE}; train it first (drop --eval-only)")
    else:
        train(out, a.vae_steps, a.dit_steps, a.threads, Path(a.vae_from) if a.vae_from else None)
    meta = json.loads((out / META_FILE).read_text())
    t0 = time.perf_counter()
    meta["quality"] = quality(out, a.guidance, a.quality_samples)
    meta["quality_seconds"] = round(time.perf_counter() - t0, 1)
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    print_table(meta["quality"])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
