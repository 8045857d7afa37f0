"""Tiny diffusers models for the JVP-attention processor tests (shared by test_kernels.py and
kernels_interpret_cases.py; not collected by pytest itself).

Each builder returns (model, primals, tangents, call) where ``call(model, *primals)`` returns the
model output tensor(s); the JVP is taken w.r.t. all primals (latents, timestep, text states).
"""
from __future__ import annotations

import copy

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernels_common import rel_err


def _rand(gen, *shape, dtype):
    return torch.randn(*shape, generator=gen, dtype=dtype)


def unet2d(dtype=torch.float64):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=8,
    ).to(dtype).eval()
    gen = torch.Generator().manual_seed(1)
    x, t = _rand(gen, 2, 3, 8, 8, dtype=dtype), torch.tensor([0.3, 0.7], dtype=dtype) * 100
    tx, tt = _rand(gen, 2, 3, 8, 8, dtype=dtype), _rand(gen, 2, dtype=dtype)

    def call(m, x, t):
        return m(x, t).sample

    return model, (x, t), (tx, tt), call


def unet2d_condition(dtype=torch.float64):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        norm_num_groups=8, attention_head_dim=8,
    ).to(dtype).eval()
    gen = torch.Generator().manual_seed(1)
    x, t = _rand(gen, 2, 4, 8, 8, dtype=dtype), torch.tensor([0.3, 0.7], dtype=dtype) * 100
    c = _rand(gen, 2, 5, 32, dtype=dtype)
    tx, tt, tc = _rand(gen, 2, 4, 8, 8, dtype=dtype), _rand(gen, 2, dtype=dtype), _rand(gen, 2, 5, 32, dtype=dtype)
    enc_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=dtype)  # padded text tokens

    def call(m, x, t, c):
        return m(x, t, encoder_hidden_states=c, encoder_attention_mask=enc_mask).sample

    return model, (x, t, c), (tx, tt, tc), call


def transformer_block(dtype=torch.float64):
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(0)
    model = BasicTransformerBlock(dim=32, num_attention_heads=4, attention_head_dim=8,
                                  cross_attention_dim=16).to(dtype).eval()
    gen = torch.Generator().manual_seed(1)
    h, c = _rand(gen, 2, 11, 32, dtype=dtype), _rand(gen, 2, 7, 16, dtype=dtype)
    th, tc = _rand(gen, 2, 11, 32, dtype=dtype), _rand(gen, 2, 7, 16, dtype=dtype)
    self_mask = torch.zeros(2, 11, 11, dtype=dtype)
    self_mask[1, :, 8:] = -1e4  # additive (B, N, N) mask, prepared by prepare_attention_mask

    def call(m, h, c):
        return m(h, attention_mask=self_mask, encoder_hidden_states=c)

    return model, (h, c), (th, tc), call


def sd3(dtype=torch.float64):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8, qk_norm="rms_norm",
    ).to(dtype).eval()
    gen = torch.Generator().manual_seed(1)
    x, t = _rand(gen, 2, 4, 8, 8, dtype=dtype), torch.tensor([300.0, 700.0], dtype=dtype)
    c, p = _rand(gen, 2, 5, 16, dtype=dtype), _rand(gen, 2, 8, dtype=dtype)
    tx, tt, tc = _rand(gen, 2, 4, 8, 8, dtype=dtype), _rand(gen, 2, dtype=dtype), _rand(gen, 2, 5, 16, dtype=dtype)

    def call(m, x, t, c):
        return m(x, encoder_hidden_states=c, pooled_projections=p, timestep=t).sample

    return model, (x, t, c), (tx, tt, tc), call


def flux(dtype=torch.float64):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
        pooled_projection_dim=8, axes_dims_rope=(4, 4, 8),
    ).to(dtype).eval()
    gen = torch.Generator().manual_seed(1)
    n_img, n_txt = 12, 5
    x, c = _rand(gen, 2, n_img, 4, dtype=dtype), _rand(gen, 2, n_txt, 16, dtype=dtype)
    t = torch.tensor([0.3, 0.7], dtype=dtype)
    p = _rand(gen, 2, 8, dtype=dtype)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(3.0), torch.arange(4.0), indexing="ij"), -1)
    img_ids = img_ids.reshape(-1, 3).to(dtype)
    txt_ids = torch.zeros(n_txt, 3, dtype=dtype)
    tx, tt, tc = _rand(gen, 2, n_img, 4, dtype=dtype), _rand(gen, 2, dtype=dtype), _rand(gen, 2, n_txt, 16, dtype=dtype)

    def call(m, x, t, c):
        return m(hidden_states=x, encoder_hidden_states=c, pooled_projections=p, timestep=t,
                 img_ids=img_ids, txt_ids=txt_ids).sample

    return model, (x, t, c), (tx, tt, tc), call


BUILDERS = {"unet2d": unet2d, "unet2d_condition": unet2d_condition,
            "transformer_block": transformer_block, "sd3": sd3, "flux": flux}


def _flat(out):
    if isinstance(out, (tuple, list)):
        return torch.cat([o.reshape(-1) for o in out])
    return out.reshape(-1)


def check_model(name, backend, dtype=torch.float64, tol=1e-9, check_grad=False):
    """torch.func.jvp of the whole model with JVPFlashAttnProcessor == stock processors on MATH SDPA."""
    from onestep.kernels import JVPFlashAttnProcessor, make_jvp_safe, set_jvp_attention

    model, primals, tangents, call = BUILDERS[name](dtype)
    ref_model = make_jvp_safe(copy.deepcopy(model))  # stock AttnProcessor2_0 needs contiguous GroupNorm input
    ours = copy.deepcopy(model)
    # the processor itself handles the GroupNorms it owns: no make_jvp_safe for our model
    set_jvp_attention(ours, backend=backend, jvp_safe_group_norm=False)
    procs = [m.processor for m in ours.modules() if hasattr(m, "set_processor")]
    assert procs and all(isinstance(p, JVPFlashAttnProcessor) for p in procs)

    with sdpa_kernel(SDPBackend.MATH):
        o_ref, od_ref = torch.func.jvp(lambda *a: _flat(call(ref_model, *a)), primals, tangents)
    o, od = torch.func.jvp(lambda *a: _flat(call(ours, *a)), primals, tangents)
    e_o, e_od = rel_err(o, o_ref), rel_err(od, od_ref)
    assert e_o <= tol and e_od <= tol, f"{name}/{backend}: rel err O {e_o:.3g}, O_dot {e_od:.3g} (tol {tol})"
    assert od_ref.abs().max() > 0
    if check_grad:
        params = dict(ours.named_parameters())
        ref_params = dict(ref_model.named_parameters())
        w = torch.randn(o.shape, generator=torch.Generator().manual_seed(5), dtype=dtype)

        g = torch.autograd.grad((_flat(call(ours, *primals)) * w).sum(), list(params.values()))
        with sdpa_kernel(SDPBackend.MATH):
            g_ref = torch.autograd.grad((_flat(call(ref_model, *primals)) * w).sum(), list(ref_params.values()))
        num = sum(((a - b) ** 2).sum() for a, b in zip(g, g_ref)).sqrt()
        den = sum((b ** 2).sum() for b in g_ref).sqrt()
        assert (num / den).item() <= tol, f"{name}/{backend}: parameter-gradient rel err {(num / den).item():.3g}"
    return e_o, e_od
