"""Train the shipped text-to-image digits teacher: a Stable Diffusion 1.5-shaped pipeline on the digits train split.

    python tools/train_digits_t2i.py [--out FOLDER] [--vae-steps N] [--unet-steps N] [--threads 2]
    python tools/train_digits_t2i.py --eval-only      # re-measure the quality of an existing folder

Every part is the SD1.5 part in miniature, so the folder loads with ``load_sd(folder, "sd15")`` and with
``diffusers.StableDiffusionPipeline.from_pretrained``:
  tokenizer     a CLIPTokenizer whose BPE merges make every caption word one token (``tokenizer_files``)
  text_encoder  a tiny CLIPTextModel, trained jointly with the UNet (SD1.5 froze a pretrained CLIP; there is
                none this small, so this one learns the captions)
  vae           an AutoencoderKL, 16x16x1 images <-> 4x8x8 latents, trained first on reconstruction + a small
                KL (Rombach et al. 2022, Sec. 3.1); scaling_factor = 1 / std of the training latents, as SD chose
                0.18215 (ibid., Sec. G)
  unet          a UNet2DConditionModel with cross-attention on the text encoder's last hidden state
  scheduler     SD1.5's: DDPM scaled_linear betas 0.00085..0.012 over 1000 integer timesteps, epsilon prediction
UNet objective (Ho et al. 2020, eq. (14), "L_simple"): || eps - eps_theta(sqrt(abar_k) z + sqrt(1 - abar_k) eps,
k, c) ||^2 with k ~ U{0..999}, z the scaled VAE latent (posterior mean) of a training image, c its caption from
TRAIN_TEMPLATES, replaced by the empty prompt "" with probability 0.1 (the pipeline's unconditional branch, so
classifier-free guidance works). Half the captions get 1-4 made-up single-character words inserted (``add_junk``)
so the text encoder reads the digit whatever words surround it; without them held-out prompts, whose new words
the encoder never saw, reach only ~87% prompt accuracy. AdamW, warmup + cosine decay, gradient clipping, EMA of
UNet and text encoder (the EMA ships). Deterministic for a given seed and thread count.

The folder also holds prompts_train.txt / prompts_heldout.txt and onestep.json: the configs, timings and the
measured quality of guided DDIM at 1 and 25 steps: FD in the digits feature space and prompt accuracy (the
feature net's class = the digit the prompt names) on held-out prompts (and on training prompts at 25 steps).
Samples are average-pooled 16x16 -> 8x8 for the feature net, and so is the reference (all 1,797 digits,
bilinearly upsampled like the training images): the pooling blurs, so native 8x8 digits would sit at FD ~120.
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

from onestep.data.digits_text import DIGIT_WORDS, HELDOUT_TEMPLATES, TRAIN_TEMPLATES, WORDS, caption, digit_of, \
    write_prompt_files
from onestep.progress import bar

ASSET = Path(__file__).resolve().parent.parent / "onestep" / "assets" / "digits_t2i"
META_FILE = "onestep.json"
IMAGE_SIZE = 16
MAX_TOKENS = 16
SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}
VAE = {"in_channels": 1, "out_channels": 1, "block_out_channels": [32, 64], "latent_channels": 4,
       "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2,
       "layers_per_block": 1, "norm_num_groups": 8, "sample_size": IMAGE_SIZE}
UNET = {"sample_size": IMAGE_SIZE // 2, "in_channels": 4, "out_channels": 4, "block_out_channels": [32, 64],
        "layers_per_block": 1, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": 32, "attention_head_dim": 8,
        "norm_num_groups": 8}
TEXT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "max_position_embeddings": MAX_TOKENS}
VAE_TRAIN = {"steps": 600, "batch": 64, "lr": 1e-3, "warmup": 50, "kl_weight": 1e-5, "seed": 0}
UNET_TRAIN = {"steps": 3000, "batch": 128, "lr": 1e-3, "warmup": 100, "weight_decay": 0.0, "ema_decay": 0.999,
              "caption_dropout": 0.1, "junk_prob": 0.5, "junk_max": 4, "grad_clip": 1.0, "seed": 0}
#: classifier-free guidance scale of the quality check (the pipeline's guidance_scale)
GUIDANCE = 3.0
QUALITY_STEPS = (1, 25)
QUALITY_SAMPLES = 1000
QUALITY_SEED = 12345
SAMPLE_BATCH = 500
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def lr_lambda(warmup: int, steps: int):
    """Linear warmup, then cosine decay to 0 over the run."""
    return lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * i / steps))


def tokenizer_files(folder: Path):
    """A CLIPTokenizer in ``folder`` whose vocabulary holds every character (alone and word-final, so any prompt
    tokenizes) and, through BPE merges, every caption word as a single token.

    CLIP's BPE applies the lowest-ranked merge present until none applies. Merges are appended word by word, each
    joining the word's current pieces left to right; an appended merge ranks after all earlier ones, so it acts
    only once a word is stuck and never changes how an earlier word tokenizes."""
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(33, 127)]
    merges: list[tuple[str, str]] = []
    for word in WORDS:
        parts = _bpe(word, merges)
        while len(parts) > 1:
            merges.append((parts[0], parts[1]))
            parts = [parts[0] + parts[1], *parts[2:]]
    tokens = list(dict.fromkeys([*chars, *(c + "</w>" for c in chars), *(a + b for a, b in merges), BOS, EOS]))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    # transformers 5: CLIPTokenizer(vocab_file=...) ignores the file; from_pretrained reads it
    tok = CLIPTokenizer.from_pretrained(str(folder), model_max_length=MAX_TOKENS)
    for word in [*WORDS, *map(str, range(10))]:
        ids = tok(word).input_ids
        if len(ids) != 3:
            raise RuntimeError(f"the digits tokenizer splits '{word}' into {tok.convert_ids_to_tokens(ids[1:-1])}")
    return tok


def _bpe(word: str, merges: list[tuple[str, str]]) -> list[str]:
    """CLIP's BPE of one word: the lowest-ranked merge present joins all its occurrences, until none applies."""
    ranks = {m: r for r, m in enumerate(merges)}
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
        rank, pair = min((ranks.get(p, math.inf), p) for p in zip(parts, parts[1:]))
        if rank == math.inf:
            break
        joined, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                joined.append(parts[i] + parts[i + 1])
                i += 2
            else:
                joined.append(parts[i])
                i += 1
        parts = joined
    return parts


def text_encoder(tok):
    from transformers import CLIPTextConfig, CLIPTextModel

    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    return CLIPTextModel(CLIPTextConfig(**TEXT, vocab_size=len(tok), **ids))


def scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER, prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False,
                         steps_offset=1)


def train_vae(images: torch.Tensor, cfg: dict):
    """Reconstruction (L1 + L2) of a posterior sample + kl_weight KL(q(z|x) || N(0, I)); then scaling_factor."""
    from diffusers import AutoencoderKL

    torch.manual_seed(cfg["seed"])
    vae = AutoencoderKL(**VAE)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg["lr"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg["warmup"], cfg["steps"]))
    pbar = bar(range(cfg["steps"]), desc="vae")
    for _ in pbar:
        x = images[torch.randint(0, images.shape[0], (cfg["batch"],))]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        # LDM's weighting: the KL (summed over latent entries) against the reconstruction summed over pixels;
        # both divided by the pixel count here, so kl_weight means what it means there
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + cfg["kl_weight"] * post.kl().mean() / rec[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        pbar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        mean = torch.cat([vae.encode(x).latent_dist.mean for x in images.split(SAMPLE_BATCH)])
        recon = torch.cat([vae.decode(z).sample.clamp(-1, 1) for z in mean.split(SAMPLE_BATCH)])
    scaling = 1.0 / mean.std().item()
    vae.register_to_config(scaling_factor=scaling)
    return vae, mean * scaling, {"recon_mse": round(F.mse_loss(recon, images).item(), 6),
                                 "scaling_factor": round(scaling, 6)}


def train_unet(latents: torch.Tensor, labels: torch.Tensor, tok, cfg: dict):
    """SD's epsilon objective on integer timesteps, the text encoder trained with the UNet; returns the EMAs."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(cfg["seed"])
    unet, te = UNet2DConditionModel(**UNET), text_encoder(tok)
    ema_unet, ema_te = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(te).requires_grad_(False)
    noise_sched = DDPMScheduler(**SCHEDULER)
    # every caption the run can draw, tokenized once: row t * 10 + d is template t of digit d, the last row is ""
    table = [caption(d, t) for t in TRAIN_TEMPLATES for d in range(len(DIGIT_WORDS))] + [""]
    ids = tok(table, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
    if tok.pad_token_id != tok.eos_token_id:
        raise RuntimeError("add_junk needs CLIP's padding with the end-of-text token (pad = eos)")
    lengths = (ids != tok.pad_token_id).sum(1) - 1  # caption tokens between bos and eos
    junk = junk_tokens(tok)
    params = [*unet.parameters(), *te.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg["warmup"], cfg["steps"]))
    pbar = bar(range(cfg["steps"]), desc="unet")
    for i in pbar:
        idx = torch.randint(0, latents.shape[0], (cfg["batch"],))
        z0, y = latents[idx], labels[idx]
        row = torch.randint(0, len(TRAIN_TEMPLATES), y.shape) * len(DIGIT_WORDS) + y
        row = torch.where(torch.rand(y.shape) < cfg["caption_dropout"], len(table) - 1, row)
        tokens = add_junk(ids[row], lengths[row], junk, cfg)
        k = torch.randint(0, SCHEDULER["num_train_timesteps"], y.shape)
        eps = torch.randn_like(z0)
        z_k = noise_sched.add_noise(z0, eps, k)  # sqrt(abar_k) z0 + sqrt(1 - abar_k) eps
        pred = unet(z_k, k, encoder_hidden_states=te(tokens)[0]).sample
        loss = F.mse_loss(pred, eps)
        if not torch.isfinite(loss):
            raise RuntimeError(f"unet loss is {loss.item()} at step {i}; lower --lr or check the latents")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"])
        opt.step()
        sched.step()
        _ema_update([ema_unet, ema_te], [unet, te], min(cfg["ema_decay"], (1 + i) / (10 + i)))
        pbar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return ema_unet.eval(), ema_te.eval()


def junk_tokens(tok) -> torch.Tensor:
    """Ids of the single-character tokens a prompt can produce (CLIP lowercases) that name no digit: the made-up
    words of ``add_junk``."""
    vocab = tok.get_vocab()
    return torch.tensor(sorted(i for t, i in vocab.items() if len(t.removesuffix("</w>")) == 1
                               and not t[0].isdigit() and not t[0].isupper()))


def add_junk(ids: torch.Tensor, lengths: torch.Tensor, junk: torch.Tensor, cfg: dict) -> torch.Tensor:
    """With probability junk_prob, insert 1..junk_max random junk tokens at random places of a caption.

    Held-out prompts hold words the training captions never use (their embeddings stay at their random init) and
    put the digit at new places; made-up words teach the text encoder to read the digit whatever surrounds it.
    Rows are [bos, caption, eos, pad...] with pad = eos, so a longer caption just overwrites padding."""
    out = ids.clone()
    for b in (torch.rand(ids.shape[0]) < cfg["junk_prob"]).nonzero().flatten().tolist():
        n = int(lengths[b])
        room = min(cfg["junk_max"], MAX_TOKENS - 2 - n)
        if n == 0 or room < 1:  # the empty prompt stays the unconditional branch
            continue
        words = ids[b, 1:1 + n].tolist()
        for _ in range(int(torch.randint(1, room + 1, ()))):
            words.insert(int(torch.randint(0, len(words) + 1, ())), int(junk[torch.randint(0, len(junk), ())]))
        out[b, 1:1 + len(words)] = torch.tensor(words)
    return out


@torch.no_grad()
def _ema_update(emas, nets, decay: float) -> None:
    for ema, net in zip(emas, nets):
        for pe, p in zip(ema.parameters(), net.parameters()):
            pe.lerp_(p, 1 - decay)


def train(out: Path, vae_steps: int, unet_steps: int, threads: int) -> dict:
    from diffusers import StableDiffusionPipeline

    from onestep.data.digits import load_digits_tensors

    images, labels = load_digits_tensors("train", IMAGE_SIZE)
    vae_cfg, unet_cfg = VAE_TRAIN | {"steps": vae_steps}, UNET_TRAIN | {"steps": unet_steps}
    t0 = time.perf_counter()
    vae, latents, vae_info = train_vae(images, vae_cfg)
    t1 = time.perf_counter()
    print(f"vae: reconstruction MSE {vae_info['recon_mse']}, scaling_factor {vae_info['scaling_factor']} "
          f"({t1 - t0:.0f} s)", flush=True)
    if out.exists():
        shutil.rmtree(out)
    tok = tokenizer_files(out / "tokenizer")
    unet, te = train_unet(latents, labels, tok, unet_cfg)
    t2 = time.perf_counter()
    print(f"unet + text encoder: {t2 - t1:.0f} s", flush=True)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=scheduler(),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(out), safe_serialization=True)
    write_prompt_files(out)
    info = {"tool": "tools/train_digits_t2i.py", "vae": VAE, "unet": UNET, "text_encoder": TEXT,
            "scheduler": SCHEDULER | {"prediction_type": "epsilon"}, "max_tokens": MAX_TOKENS,
            "vae_training": vae_cfg | vae_info, "unet_training": unet_cfg, "threads": threads,
            "train_seconds": {"vae": round(t1 - t0, 1), "unet": round(t2 - t1, 1), "total": round(t2 - t0, 1)}}
    (out / META_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info


@torch.no_grad()
def quality(folder: Path, guidance: float = GUIDANCE) -> dict:
    """FD (digits features of samples pooled to 8x8, vs all 1,797 digits) and prompt accuracy of guided DDIM
    samples from held-out prompts, through the project's SD1.5 adapter."""
    from onestep.data.digits import load_digits_tensors
    from onestep.denoisers.base import guided
    import onestep.teachers  # noqa: F401  (registers the pipeline-folder layouts that load_sd checks)
    from onestep.denoisers.sd import load_sd
    from onestep.rewards.digits_features import load_digits_features
    from onestep.eval.fid import feature_metrics, stats_of
    from onestep.sampling import sample

    sd = load_sd(folder, "sd15")
    teacher = guided(sd.denoiser, guidance)
    feats = load_digits_features()
    pool = lambda x: F.adaptive_avg_pool2d(x, 8)  # noqa: E731 - the feature net reads 8x8 digits
    # the reference takes the samples' path: bilinear 8 -> 16 (the training images), average-pool 16 -> 8. Against
    # the native 8x8 digits the pooled ones alone are at FD ~120: the round trip blurs by [1, 6, 1] / 8 per axis
    upsampled, _ = load_digits_tensors("all", sd.image_size)
    ref = stats_of(feats.features(pool(upsampled)))
    g = torch.Generator().manual_seed(QUALITY_SEED)
    noise = torch.randn(QUALITY_SAMPLES, *sd.denoiser.data_shape, generator=g)
    digits = torch.randint(0, len(DIGIT_WORDS), (QUALITY_SAMPLES,), generator=g)
    pick = torch.randint(0, 1 << 30, (QUALITY_SAMPLES,), generator=g).tolist()
    split_prompts = {split: [caption(d, templates[i % len(templates)]) for d, i in zip(digits.tolist(), pick)]
                     for split, templates in (("heldout", HELDOUT_TEMPLATES), ("train", TRAIN_TEMPLATES))}
    # the floor the UNet cannot beat: real digits through the VAE (encode the posterior mean, decode)
    recon = torch.cat([pool(sd.codec.decode(sd.codec.encode(x))) for x in upsampled.split(SAMPLE_BATCH)])
    out = {"samples": QUALITY_SAMPLES, "prompts": "uniform digits, uniform templates", "guidance": guidance,
           "sampler": "ddim", "reference": "all 1797 digits, upsampled to 16x16 and pooled back like the samples",
           "pooling": f"{sd.image_size}x{sd.image_size} average-pooled to 8x8",
           "vae_floor_fd": round(feature_metrics(feats.features(recon), ref)["fd"], 4)}
    runs = [("heldout", steps) for steps in QUALITY_STEPS] + [("train", QUALITY_STEPS[-1])]
    for split, steps in runs:
        prompts = split_prompts[split]
        images = []
        for i in bar(range(0, QUALITY_SAMPLES, SAMPLE_BATCH), desc=f"{split} {steps}-step", leave=False):
            cond = sd.text.cond(prompts[i:i + SAMPLE_BATCH])
            z = sample(teacher, noise[i:i + SAMPLE_BATCH], sd.denoiser.schedule.default_ts(steps), cond, method="ddim")
            images.append(pool(sd.codec.decode(z)))
        f = feats.features(torch.cat(images))
        target = torch.tensor([digit_of(p) for p in prompts])
        acc = (feats.head(f).argmax(1) == target).double().mean().item()
        key = f"{steps}_step" + ("" if split == "heldout" else "_train_prompts")
        out[key] = {"fd": round(feature_metrics(f, ref)["fd"], 4), "prompt_acc": round(acc, 4)}
    return out


def print_table(q: dict) -> None:
    print(f"\n{q['samples']} samples per row, DDIM, guidance {q['guidance']}; FD floor (VAE round trip) "
          f"{q['vae_floor_fd']:.3f}")
    print(f"{'prompts':>8} {'steps':>6} {'FD':>9} {'prompt acc':>11}")
    for key, r in q.items():
        if key.split("_")[0].isdigit():
            split = "train" if key.endswith("train_prompts") else "heldout"
            print(f"{split:>8} {key.split('_')[0]:>6} {r['fd']:>9.3f} {r['prompt_acc']:>11.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ASSET))
    p.add_argument("--vae-steps", type=int, default=VAE_TRAIN["steps"])
    p.add_argument("--unet-steps", type=int, default=UNET_TRAIN["steps"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--guidance", type=float, default=GUIDANCE)
    p.add_argument("--eval-only", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    if a.eval_only:
        if not (out / META_FILE).is_file():
            raise SystemExit(f"--eval-only: '{out}' has no {META_FILE}; train it first (drop --eval-only)")
    else:
        train(out, a.vae_steps, a.unet_steps, a.threads)
    meta = json.loads((out / META_FILE).read_text())
    meta["quality"] = quality(out, a.guidance)
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    print_table(meta["quality"])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
