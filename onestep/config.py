"""Typed config schemas, registered in Hydra's ConfigStore. Defaults live here and only here.

Groups: teacher/ generator/ objective/ data/ trainer/ eval/ (dataclass nodes, so a wrong key fails at
compose time) and experiment/ (yaml files under configs/experiment that pick options and override fields).
Objectives register their own Config dataclass (see objectives/base.py); teacher families their ``teacher=``
presets (onestep/teachers/).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

_cs = ConfigStore.instance()

#: longest run-folder name made of overrides; longer ones keep a readable prefix plus a hash of the rest
MAX_RUN_NAME = 120


def run_name(override_dirname: str) -> str:
    """The run folder's name from Hydra's ``override_dirname`` (file-system safe, bounded length)."""
    import hashlib

    name = override_dirname.replace("/", "_")
    if len(name) <= MAX_RUN_NAME:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:12]
    return f"{name[:MAX_RUN_NAME - 13]}-{digest}"


if not OmegaConf.has_resolver("onestep.run_name"):
    OmegaConf.register_new_resolver("onestep.run_name", run_name)


def asset(name: str) -> str:
    """The absolute path of a shipped asset (onestep/assets/<name>), for configs: ${onestep.asset:digits_t2i}."""
    from pathlib import Path

    return str(Path(__file__).resolve().parent / "assets" / name)


if not OmegaConf.has_resolver("onestep.asset"):
    OmegaConf.register_new_resolver("onestep.asset", asset)


def store(group: str | None, name: str, node) -> None:
    _cs.store(group=group, name=name, node=node)


@dataclass
class TeacherConfig:
    #: gmm = exact mixture score; gmm_learned = an MLP trained by DSM on that mixture
    kind: str = "gmm"
    mixture: str = "ring"
    mixture_args: dict[str, Any] = field(default_factory=dict)
    schedule: str = "vp_linear"
    schedule_args: dict[str, Any] = field(default_factory=dict)
    #: classifier-free guidance scale of the real score (1 = no guidance)
    guidance: float = 1.0
    #: model folder: for kind=digits a diffusers save_pretrained UNet + onestep.json (None = the shipped one); for
    #: kind=sd15 / sdxl a local diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
    #: scheduler/; SDXL also text_encoder_2/, tokenizer_2/). Schedule and prediction type come from its scheduler/
    path: Optional[str] = None
    #: text-to-image teachers: the prompt of CFG's unconditional branch (None = the pipeline's default: "" for
    #: SD1.5/2.x, zero embeddings for SDXL)
    negative_prompt: Optional[str] = None
    #: text-to-image teachers: image side in pixels (None = the unet's sample_size times the VAE's downsampling)
    resolution: Optional[int] = None
    #: sd3 / flux / wan / cogvideox: T5 tokens per prompt (None = the pipeline's call default: SD3 256, Flux 512,
    #: Wan 512, CogVideoX 226)
    max_sequence_length: Optional[int] = None
    #: video teachers (wan, cogvideox): pixel frames per video (None = the pipeline's default: Wan 81, CogVideoX 49);
    #: the side of its square frames is teacher.resolution (None = the pipeline's default size: Wan 480 x 480,
    #: CogVideoX 480 x 720)
    num_frames: Optional[int] = None
    #: wan (2.2 A14B): WanPipeline's guidance_scale_2, the low-noise expert's CFG scale when the teacher is guided at
    #: teacher.guidance (None = teacher.guidance)
    guidance_2: Optional[float] = None
    #: the DSM-trained MLP: learned teacher, and the init of generator and critic for GMM experiments
    net_hidden: int = 256
    net_depth: int = 3
    #: scale of the MLP's Fourier time embedding (frequencies ~ N(0, scale^2) on c_noise = log(sigma)/4); smaller
    #: scales give smoother d/dt of the net, which the sCM / rCM tangent differentiates
    net_time_scale: float = 1.0
    net_steps: int = 2000
    net_lr: float = 2e-3
    net_batch: int = 1024


@dataclass
class LoraConfig:
    """LoRA adapters (peft) on the shared frozen base instead of a full copy of the network."""

    #: adapter rank; None = train the full network (a copy)
    rank: Optional[int] = None
    #: LoRA alpha (scale alpha / rank); None = rank
    alpha: Optional[float] = None
    #: module-name suffixes that get adapters; None = the attention projections (to_q, to_k, to_v, to_out.0) of
    #: diffusers models, every Linear layer of other nets. Add convs for more capacity, e.g. [to_q, to_k, to_v,
    #: to_out.0, conv1, conv2, proj_in, proj_out, ff.net.0.proj, ff.net.2]
    target_modules: Optional[list[str]] = None


@dataclass
class GeneratorConfig:
    #: number of student steps; the t-list is ``ts`` if given, else the schedule's default t-list
    steps: int = 1
    ts: Optional[list[float]] = None
    #: start the t-list where sigma/alpha equals this (SiD's sigma_init) instead of at t_max; the generator
    #: then maps sigma(t_0) z, and a teacher-initialized generator already outputs coarse structure
    sigma_init: Optional[float] = None
    #: multi-step student sampling: renoise (consistency / DMD2 style) or ddim
    method: str = "renoise"
    #: attention of diffusers-model generators: default (SDPA) | math | jvp_flash (onestep.kernels, O(N)-memory
    #: JVP for sCM / rCM); a no-op for the MLP. See onestep/denoisers/attention.py
    attention: str = "default"
    #: wrap the generator so that x0(x, t_min) = x exactly (consistency models' c_skip / c_out boundary)
    consistency_boundary: bool = False
    #: the generator's own architecture ("" = a copy of the teacher's network): changes to the teacher network's
    #: construction arguments, 'key=value,...' with YAML values (the MLP's hidden / depth / time_dim / time_scale; a
    #: diffusers model's config keys, e.g. 'mid_block_type=null' or 'block_out_channels=[16,32]'), or the path of a
    #: diffusers config .json of the teacher network's class. Tensors whose name and shape match the teacher's are
    #: copied from it (dropping blocks keeps the rest: BK-SDM); the critic stays teacher-shaped. See
    #: onestep/denoisers/slim.py
    arch: str = ""
    # The next keys shape the network and are read by one objective's ``shape_generator`` (objectives/base.py), named
    # in each comment; under any other objective they stay at these defaults.
    #: read by objective=guidance_distill: the generator takes the guidance scale w as an input (Meng et al. 2023) and
    #: uses this w when the conditioning carries none (sampling, eval); None = no guidance input
    guidance_input: Optional[float] = None
    #: read by objective=msd: K students, each a copy of the student init that serves a partition of the classes
    #: (``partition``: contiguous | interleaved); a router picks the student per class
    students: int = 1
    partition: str = "contiguous"
    #: read by objective=phased_dmd: one expert per student step (generator.experts = generator.steps), a copy of the
    #: student init routed by t, so step i runs expert i (denoisers/experts.py); 1 = one network for every step
    experts: int = 1
    #: read by objective=nct: a ControlNet adapter on the student's UNet that reads the conditioning's control map:
    #: unet (built from the student's UNet, ControlNetModel.from_unet: zero-initialised, the student unchanged at start)
    #: or a local diffusers ControlNetModel folder; None = no adapter
    control_adapter: Optional[str] = None
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class CriticConfig:
    """The fake-score critic (objectives that train one): a full copy of the teacher's network, or LoRA."""

    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    kind: str = "gmm"
    #: prompts: a text file, one prompt per line; image_text: a folder of images, each with a same-name .txt caption;
    #: video_text: a folder of videos (.gif, .webp, .mp4, .safetensors, .pt), each with a same-name .txt caption;
    #: webdataset: tar shards, brace-expanded ('shards/{00000..01023}.tar'; several patterns joined by '::')
    path: Optional[str] = None
    #: content-addressed caches of text embeddings and image / video latents (None = <out_root>/cache)
    cache: Optional[str] = None
    #: text-to-image: prompts the evaluation draws from (held-out prompts); None = data.path
    eval_path: Optional[str] = None


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0


@dataclass
class TrainerConfig:
    #: training steps, each objective.ttur critic updates and one generator update (warm-ups, EMA, logging and
    #: checkpoints count steps, whatever trainer.grad_accum)
    steps: int = 1000
    #: samples of one micro-batch, every process together (the global batch when trainer.grad_accum=1)
    batch_size: int = 512
    #: gradient accumulation: micro-batches per optimizer update, critic and generator alike; the update is the one of
    #: a batch of batch_size * grad_accum samples (under several processes gradients are reduced once per update)
    grad_accum: int = 1
    generator_optim: OptimConfig = field(default_factory=OptimConfig)
    critic_optim: OptimConfig = field(default_factory=OptimConfig)
    grad_clip: float = 10.0
    ema_decay: float = 0.99
    #: no | fp16 | bf16 (accelerate's mixed precision)
    mixed_precision: str = "no"
    cpu: bool = False
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    #: how checkpoints are written: dcp (every process writes its own shards with torch.distributed.checkpoint,
    #: nothing is gathered) | safetensors (whole tensors gathered to the main process) | auto (dcp when training
    #: under FSDP, else safetensors). Resume, export and sample read either
    checkpoint_format: str = "auto"
    log_every: int = 25
    #: evaluate the student every N steps (0 = only at the end)
    eval_every: int = 0
    sample_every: int = 0
    #: experiment tracker fed with the stats, evaluations and sample grids (onestep/train/tracking.py):
    #: tensorboard (event files in <run>/tb/) | wandb (WANDB_MODE=offline works) | none | auto (tensorboard
    #: when the tensorboard package is installed, else none). The JSONL files are written either way
    log_with: str = "auto"
    #: consecutive updates with a non-finite loss or gradient (on any rank) tolerated, each skipped and counted
    #: as bad_steps in stats.jsonl, before the run stops
    max_bad_steps: int = 10
    #: continue from the run folder's newest readable checkpoint; false = start at step 0, moving earlier
    #: checkpoints and logs aside (into <run>/discarded-<time>/)
    resume: bool = True
    #: start from another run's weights (a run folder: its newest checkpoint, or a checkpoint folder): every network
    #: role both runs have (generator, generator_ema, critic, heads) is loaded before step 0; the optimizers, step and
    #: RNG start fresh, and a role the other run lacks (a GAN head added in this stage) starts as usual. A two-stage
    #: schedule, e.g. DMD2's GAN stage resumed from its no-GAN run (configs/experiment/digits_dmd2_gan.yaml). This
    #: run's own checkpoint, once it has one, wins (trainer.resume)
    init_from: Optional[str] = None
    progress: bool = True
    #: dtype of the frozen networks (teacher, and the shared base under LoRA): fp32 | bf16 | fp16
    frozen_dtype: str = "fp32"
    #: activation checkpointing in the trained diffusers networks (less memory, ~30% more compute)
    gradient_checkpointing: bool = False
    #: under several processes, shard generator and critic (weights, gradients, AdamW moments) with torch's FSDP2
    #: instead of replicating them (onestep/fsdp.py); also switched on by an accelerate FSDP launch config
    fsdp: bool = False
    #: torch.compile the run's networks in place (generator, critic, targets, teacher; the networks an objective
    #: differentiates with torch.func.jvp stay eager: sCM / rCM's generator)
    compile: bool = False
    #: torch.compile mode: auto (max-autotune on CUDA, default elsewhere) | default | reduce-overhead | max-autotune |
    #: max-autotune-no-cudagraphs
    compile_mode: str = "auto"


@dataclass
class ClipConfig:
    #: open_clip architecture name (e.g. ViT-B-32) or a model-config .json file
    model: str = "ViT-B-32"
    #: local weights file (.pt / .bin / .safetensors); nothing is downloaded
    checkpoint: Optional[str] = None
    #: text file with one prompt per line
    prompts: Optional[str] = None
    #: text put before every caption for the coco2014 protocols' CLIP score: "A photo depicts " (GigaGAN's
    #: evaluation/evaluation.py compute_clip_score, DMD2's main/coco_eval/coco_evaluator.py, after Hessel et al. 2021)
    prefix: str = ""


@dataclass
class RewardsConfig:
    """Preference and diversity scores of text-to-image samples (onestep/rewards/), each reported when configured."""

    #: ImageReward's released weights ImageReward.pt (BLIP ViT-L + BERT + MLP head); None = not reported
    imagereward: Optional[str] = None
    #: local folder of bert-base-uncased's tokenizer (vocab.txt): ImageReward's prompts go through it
    imagereward_tokenizer: Optional[str] = None
    #: HPSv2's released weights (HPS_v2_compressed.pt or HPS_v2.1_compressed.pt); None = not reported
    hpsv2: Optional[str] = None
    #: open_clip architecture of the HPSv2 weights (an open_clip name or a model-config .json)
    hpsv2_model: str = "ViT-H-14"
    #: diversity per prompt (mean pairwise cosine distance of the samples that share a prompt): in the CLIP image
    #: embedding of eval.clip, or in the digits feature space with eval.features=digits
    diversity: bool = False


@dataclass
class EvalConfig:
    #: the evaluation protocol (onestep.eval.evaluators.PROTOCOLS); None = the teacher family's own. coco2014 /
    #: coco2014_512: zero-shot COCO FID at 256 / 512 px and CLIP score (onestep/eval/coco.py, docs/evaluation.md);
    #: edm_fid: pixel-space FID against EDM-format mu / sigma statistics in eval.reference (onestep/eval/edm_fid.py)
    protocol: Optional[str] = None
    #: coco2014 protocols: text file of captions, one a line; sample i gets caption i (the public 30k / 10k lists,
    #: e.g. DMD2's main/coco_eval/captions_coco14_test.txt)
    captions: Optional[str] = None
    #: coco2014 protocols: also FID on 299-px center crops of the full-resolution images, real and generated
    #: (DMD2's SDXL "patch FID": main/coco_eval/coco_evaluator.py compute_fid(patch_fid=True))
    patch_fid: bool = False
    num_samples: int = 10000
    teacher_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    teacher_method: str = "ddim"
    student_steps: list[int] = field(default_factory=lambda: [1])
    #: also evaluate hybrid sampling: the teacher takes the first k steps of the student's t-list, the student the
    #: rest ("Distilling Diversity and Control", Gandikota & Bau 2025); one row per k, for students of >= 2 steps
    hybrid_teacher_steps: list[int] = field(default_factory=list)
    plot: bool = True
    #: feature space of FD/FID, KID and precision/recall for image experiments: inception (clean-fid) | digits;
    #: moving_digits for the shipped text-to-video teacher (onestep.eval.moving_digits_eval)
    features: str = "inception"
    #: clean-fid's Inception weights inception-2015-12-05.pt (the file or its folder); never downloaded
    inception_path: Optional[str] = None
    #: FD reference: an image folder or an .npz (mu, sigma[, feats]); None = the experiment's own data
    reference: Optional[str] = None
    #: folder of cached reference statistics, keyed by feature extractor + content hash (None = <out_root>/fid_stats)
    stats_cache: Optional[str] = None
    clip: ClipConfig = field(default_factory=lambda: ClipConfig())
    rewards: RewardsConfig = field(default_factory=lambda: RewardsConfig())


@dataclass
class SampleConfig:
    """`onestep sample key=value ...` (not a Hydra config: it reads a finished run folder or an export folder)."""

    #: a `onestep train` run folder (its newest checkpoint's EMA generator) or a `onestep export` folder
    run_dir: Optional[str] = None
    num: int = 16
    seed: int = 0
    #: file.png (a grid) or file.safetensors (tensor ``images``, (n, C, H, W) in [0, 1]); video students: file.gif
    #: or file.mp4 (an animated grid; MP4 needs imageio[ffmpeg]) or file.safetensors (tensor ``videos``, (n, C, F, H, W))
    out: Optional[str] = None
    #: text-to-image students: every image gets this prompt
    prompt: Optional[str] = None
    #: text-to-image UNet students (sd15, sdxl): steer away from this prompt with NASA (SNOOPI's Negative-Away Steer
    #: Attention, in every cross-attention layer; CFG does not work in one step)
    negative_prompt: Optional[str] = None
    #: NASA's alpha: Z = Z+ - alpha Z- in each cross-attention layer (default 0.1, SNOOPI Sec. 6.1 for SD1.5 students)
    nasa_scale: Optional[float] = None
    #: class-conditional students: every image gets this label (default: labels i % num_classes)
    class_label: Optional[int] = None
    #: student steps (default: the step count it was trained for)
    steps: Optional[int] = None
    cpu: bool = False


@dataclass
class ExportConfig:
    """`onestep export key=value ...`: a run folder's student -> a diffusers pipeline folder."""

    run_dir: Optional[str] = None
    out: Optional[str] = None
    #: replace a previous export in ``out`` (a non-export folder is never deleted)
    overwrite: bool = False
    #: export the latest checkpoint of a run that has not reached trainer.steps
    allow_unfinished: bool = False
    #: LoRA students: write the adapter (pytorch_lora_weights.safetensors, pipe.load_lora_weights) next to the
    #: teacher's UNet instead of merging it
    lora_only: bool = False
    #: export the generator's EMA (``generator_ema``); false = the raw generator
    ema: bool = True
    #: SD-family: also write one original-layout .safetensors (StableDiffusionPipeline.from_single_file)
    single_file: bool = True


@dataclass
class EvalRunConfig:
    """`onestep eval key=value ... [eval.<key>=value ...]`: a run's checkpoints evaluated under one protocol from a
    process of its own (onestep/eval/watch.py); eval.<key>=value arguments change the run's eval section."""

    #: a `onestep train` run folder (it may still be training); rows go to <run_dir>/eval/<protocol>.jsonl
    run_dir: Optional[str] = None
    #: the evaluation protocol (onestep.eval.evaluators.PROTOCOLS); None = the run's eval.protocol, else its teacher
    #: family's own
    protocol: Optional[str] = None
    #: keep polling for new checkpoints until the run's last one (step trainer.steps) has been evaluated
    watch: bool = False
    #: seconds between two looks at the run's checkpoints in watch mode
    poll_s: float = 60.0
    progress: bool = True
    cpu: bool = False


@dataclass
class RewardConfig:
    """``reward=<name>``: a differentiable reward of decoded samples and their prompts (onestep/rewards/registry.py),
    for objectives that tune toward it; when set, evaluation reports its mean as ``reward``."""

    #: none | digits_class | digits_diversity | clip | clip_diversity | imagereward | hpsv2, or your own reward as
    #: <module>:<factory> (the module importable; factory(reward section) returns an nn.Module, forward(images,
    #: prompts) -> (N,))
    name: str = "none"
    #: local weights: clip / clip_diversity an open_clip checkpoint, imagereward ImageReward.pt, hpsv2 HPS_v2*.pt; digits_* a digits
    #: feature network folder (None = the shipped one)
    weights: Optional[str] = None
    #: clip / clip_diversity / hpsv2: the open_clip architecture (a name or a model-config .json; hpsv2 default ViT-H-14)
    model: Optional[str] = None
    #: imagereward: the folder of bert-base-uncased's tokenizer
    tokenizer: Optional[str] = None


@dataclass
class CacheConfig:
    """`onestep cache key=value ... [experiment=... teacher.* data.* ...]`: the teacher's VAE latents and text
    embeddings of a dataset, computed once over every process of a launch (onestep/train/cache.py)."""

    #: the folder for the cached tar shards (read them with data=webdataset data.path=<the printed pattern>);
    #: not needed for data=prompts, whose embeddings go to the run's text-embedding cache (data.cache)
    out: Optional[str] = None
    #: samples per output shard
    shard_size: int = 1000
    progress: bool = True


@dataclass
class RunsConfig:
    """`onestep runs key=value ...`: the run folders under a folder, one line each."""

    #: the folder to scan (None = the training default, Config.out_root)
    out_root: Optional[str] = None


@dataclass
class BenchConfig:
    """`onestep bench`: quality vs number of function evaluations, one protocol for every model."""

    #: student run folders; each contributes its latest checkpoint's generator_ema. With runs, the teacher,
    #: data and evaluator come from the runs' config (all runs must share one teacher section)
    runs: list[str] = field(default_factory=list)
    #: teacher samplers (see onestep.sampling.METHODS) and step counts; NFE = steps (heun: 2 steps - 1)
    teacher_methods: list[str] = field(default_factory=lambda: ["ddim", "heun"])
    teacher_steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    student_steps: list[int] = field(default_factory=lambda: [1, 2, 4])
    #: samples per point (None = eval.num_samples); every point uses the same noise and labels
    num_samples: Optional[int] = None
    seed: int = 12345
    #: output folder (None = <out_root>/bench/<experiment>); each finished point is cached there
    out: Optional[str] = None
    progress: bool = True


@dataclass
class Config:
    teacher: Any = None
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    objective: Any = None
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    seed: int = 0
    #: run folder; the CLI fills it from the experiment name and overrides (the run's identity)
    run_dir: Optional[str] = None
    out_root: str = "runs"
    #: modules imported before the config is composed: third-party teacher families and objectives (onestep/plugins.py)
    plugins: list = field(default_factory=list)


store(None, "base_config", Config)
store("generator", "default", GeneratorConfig)
store("data", "gmm", DataConfig)
store("data", "digits", DataConfig(kind="digits"))
store("data", "prompts", DataConfig(kind="prompts"))
store("data", "image_text", DataConfig(kind="image_text"))
#: captioned images streamed from WebDataset tar shards, resumable (onestep/data/shards.py)
store("data", "webdataset", DataConfig(kind="webdataset"))
#: captioned videos for video teachers (onestep/data/video_text.py)
store("data", "video_text", DataConfig(kind="video_text"))
#: the shipped moving-digits videos with their captions, encoded by the teacher's VAE (onestep/data/moving_digits.py)
store("data", "moving_digits_text", DataConfig(kind="moving_digits_text"))
#: the digits train split with training-template captions, VAE-encoded by the teacher (shipped digits_t2i teacher)
store("data", "digits_text", DataConfig(kind="digits_text"))
store("trainer", "default", TrainerConfig)
#: reward=<name> (onestep/rewards/registry.py)
for _name in ("none", "digits_class", "digits_diversity", "clip", "clip_diversity", "imagereward", "hpsv2"):
    store("reward", _name, RewardConfig(name=_name))
store("eval", "gmm", EvalConfig)
store("eval", "digits", EvalConfig(num_samples=2000, teacher_steps=[1, 32], features="digits"))
#: text-to-image: a small fixed prompt set, teacher at 25 DDIM steps (CLIP score / FID only when configured)
store("eval", "t2i", EvalConfig(num_samples=64, teacher_steps=[25]))
#: zero-shot COCO 2014 (GigaGAN's evaluation/evaluation.py, as DMD2 and SiD-LSG report it): 30k captions, FID at 256 px,
#: CLIP score of open_clip ViT-g-14 (laion2b_s12b_b42k) with the prefix "A photo depicts "; teacher at 25 steps
store("eval", "coco2014", EvalConfig(protocol="coco2014", num_samples=30000, teacher_steps=[25],
                                     clip=ClipConfig(model="ViT-g-14", prefix="A photo depicts ")))
#: the same at 512 px (crop and LANCZOS resize to 512 instead of 256)
store("eval", "coco2014_512", EvalConfig(protocol="coco2014_512", num_samples=30000, teacher_steps=[25],
                                         clip=ClipConfig(model="ViT-g-14", prefix="A photo depicts ")))
#: class-conditional FID-50k against EDM-format reference statistics (NVlabs/edm fid.py; eval.reference=<.npz>)
store("eval", "edm_fid50k", EvalConfig(protocol="edm_fid", num_samples=50000, teacher_steps=[1, 18]))
#: the shipped text-to-image digits teacher: digits feature space, prompt accuracy, teacher at 1 and 25 DDIM steps
store("eval", "digits_t2i", EvalConfig(num_samples=2000, teacher_steps=[1, 25], features="digits"))
#: the shipped text-to-video moving-digits teacher: per-frame FD in the digits feature space, prompt accuracy (digit
#: and direction), temporal consistency; teacher at 1 and 32 Euler steps
store("eval", "moving_digits", EvalConfig(num_samples=1000, teacher_steps=[1, 32], teacher_method="euler",
                                          features="moving_digits"))
