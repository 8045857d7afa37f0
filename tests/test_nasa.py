"""NASA (SNOOPI's Negative-Away Steer Attention, onestep/denoisers/nasa.py) on the tiny random SD1.5 UNet of
tests/sd_fixtures.py: alpha = 0 is the plain UNet; every cross-attention layer's output equals an fp64
transcription of eqs. (7)-(9), W_o (softmax(Q K+^T / sqrt d) V+ - alpha softmax(Q K-^T / sqrt d) V-) + b_o; the
positive prompt as its own negative at alpha = 1 cancels the attention (the layer outputs to_out(0) = b_o); the
processors come back after the context; and `onestep sample negative_prompt=...` on a tiny trained SD1.5 student
(run folder and export folder: the same images) writes its PNG, with one-line errors for bad requests."""

from __future__ import annotations

import pytest
import torch

from conftest import compose
from sd_fixtures import MAX_TOKENS, TEXT_DIM, make_tiny_sd15, unet, write_prompts
from onestep import cli
from onestep.denoisers.nasa import DEFAULT_SCALE, check_scale, cross_attention_modules, nasa_attention
from onestep.errors import ConfigError
from onestep.export.sample import check_nasa_request


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = unet().eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    pos = torch.randn(2, MAX_TOKENS, TEXT_DIM, generator=g)
    neg = torch.randn(1, MAX_TOKENS - 5, TEXT_DIM, generator=g)  # its own token count, one row for the batch
    return model, x, torch.tensor([700.0, 250.0]), pos, neg


def _run(model, x, t, pos):
    return model(x, t, encoder_hidden_states=pos).sample


def _capture(model):
    """Each cross-attention layer's (hidden_states, encoder_hidden_states, output), via forward hooks."""
    seen, hooks = {}, []
    for name, m in cross_attention_modules(model):
        def hook(mod, args, kwargs, out, name=name):
            seen[name] = (args[0] if args else kwargs["hidden_states"], kwargs["encoder_hidden_states"], out)
        hooks.append(m.register_forward_hook(hook, with_kwargs=True))
    return seen, hooks


def _eq_7_9(attn, hidden, pos, neg, alpha):
    """fp64 transcription: per head, Z+- = softmax(Q K+-^T / sqrt d) V+-, Z = Z+ - alpha Z-, then W_o Z + b_o."""
    d = lambda w: w.detach().double()  # noqa: E731
    h = attn.heads
    q = hidden.double() @ d(attn.to_q.weight).T
    neg = neg.double().expand(hidden.shape[0], -1, -1)

    def split(x):  # (B, N, h*dh) -> (B, h, N, dh)
        return x.view(x.shape[0], x.shape[1], h, -1).transpose(1, 2)

    def z(text):
        k, v = split(text.double() @ d(attn.to_k.weight).T), split(text.double() @ d(attn.to_v.weight).T)
        qh = split(q)
        scores = qh @ k.transpose(-1, -2) / qh.shape[-1] ** 0.5
        return torch.softmax(scores, -1) @ v

    z_nasa = z(pos) - alpha * z(neg)
    z_nasa = z_nasa.transpose(1, 2).reshape(hidden.shape[0], hidden.shape[1], -1)
    return z_nasa @ d(attn.to_out[0].weight).T + d(attn.to_out[0].bias)


def test_alpha_zero_is_the_plain_unet_and_processors_come_back(net):
    model, x, t, pos, neg = net
    before = {name: m.processor for name, m in cross_attention_modules(model)}
    assert len(before) == 4  # the down block, the mid block and the up block's two transformers
    plain = _run(model, x, t, pos)
    with nasa_attention(model, neg, 0.0) as proc:
        assert all(m.processor is proc for _, m in cross_attention_modules(model))
        steered = _run(model, x, t, pos)
    assert {name: m.processor for name, m in cross_attention_modules(model)} == before
    err = (steered - plain).abs().max().item()
    print(f"alpha=0: max |NASA - plain| = {err:.2e} (output scale {plain.abs().max().item():.2f})")
    assert err <= 1e-6 * plain.abs().max().item()
    # an exception inside the context also restores them
    with pytest.raises(RuntimeError), nasa_attention(model, neg, 0.5):
        raise RuntimeError("inside")
    assert {name: m.processor for name, m in cross_attention_modules(model)} == before


@pytest.mark.parametrize("alpha,rows", [(DEFAULT_SCALE, 1), (0.7, 2)])
def test_every_cross_attention_layer_is_eq_7_9_in_fp64(net, alpha, rows):
    model, x, t, pos, neg = net
    neg = neg.expand(rows, -1, -1).clone() + torch.arange(rows).view(-1, 1, 1) * 0.3  # per-row negatives too
    seen, hooks = _capture(model)
    try:
        _run(model, x, t, pos)
        plain_out = {name: out for name, (_, _, out) in seen.items()}
        seen.clear()
        with nasa_attention(model, neg, alpha):
            _run(model, x, t, pos)
    finally:
        for hk in hooks:
            hk.remove()
    modules = dict(cross_attention_modules(model))
    for name, (hidden, text, out) in seen.items():
        want = _eq_7_9(modules[name], hidden, text, neg, alpha)
        err = (out.double() - want).abs().max().item()
        moved = (out - plain_out[name]).abs().max().item()
        print(f"{name}: alpha={alpha} max err vs fp64 eqs. (7)-(9) {err:.2e}; NASA moved the layer by {moved:.3f}")
        assert err <= 1e-5 * want.abs().max().item(), name
        assert moved > 1e-3, name  # the negative branch acts: the check could fail


def test_the_prompt_as_its_own_negative_at_alpha_one_cancels_the_attention(net):
    model, x, t, pos, _ = net
    seen, hooks = _capture(model)
    try:
        with nasa_attention(model, pos, 1.0):
            _run(model, x, t, pos)
    finally:
        for hk in hooks:
            hk.remove()
    for name, m in cross_attention_modules(model):
        out = seen[name][2]
        bias = m.to_out[0].bias.detach().expand_as(out)  # Z_NASA = Z+ - Z+ = 0, so the layer gives W_o 0 + b_o
        assert (out - bias).abs().max().item() <= 1e-6, name


def test_bad_requests_are_one_line():
    plain = unet(cross_attention_dim=None)
    with pytest.raises(ConfigError) as e, nasa_attention(plain, torch.zeros(1, 4, TEXT_DIM), 0.1):
        pass
    assert "no cross-attention" in str(e.value) and "\n" not in str(e.value)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="nasa_scale=") as e:
            check_scale(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="needs a negative prompt") as e:
        check_nasa_request(None, 0.3)
    assert "\n" not in str(e.value) and "negative_prompt=" in str(e.value)
    assert check_nasa_request("blurry", None) == DEFAULT_SCALE == 0.1 and check_nasa_request("", 0.0) == 0.0
    assert check_nasa_request(None, None) is None


@pytest.mark.slow
def test_onestep_sample_with_a_negative_prompt(tmp_path, capsys):
    """A 2-step-trained SD1.5 DMD2 student: sample_run with NASA at alpha = 0 is the plain sample, at 0.5 another
    image; the export folder with the same negative prompt gives the run's images (plain diffusers + NASA on its
    unet); `onestep sample ... negative_prompt=... nasa_scale=...` writes the PNG; bad requests are one line."""
    from onestep.runs import load_run
    from onestep.export.pipelines import export
    from onestep.export.sample import sample_export, sample_run
    from onestep.train.trainer import train

    prompt = "a red square"
    sd = make_tiny_sd15(tmp_path / "sd15")
    prompts = write_prompts(tmp_path / "prompts.txt", [prompt, "a blue circle"])
    cfg = compose(["experiment=sd15_dmd2", f"teacher.path={sd}", f"data.path={prompts}", "trainer.steps=2",
                   "trainer.batch_size=2", "trainer.progress=false", "eval.num_samples=2", "eval.teacher_steps=[1]",
                   "eval.plot=false", "trainer.checkpoint_every=2", f"out_root={tmp_path}"])
    train(cfg, tmp_path / "run")
    run = load_run(tmp_path / "run", torch.device("cpu"), frozen_dtype="fp32")
    plain = sample_run(run, 2, seed=3, prompt=prompt)
    zero = sample_run(run, 2, seed=3, prompt=prompt, negative_prompt="a blue circle", nasa_scale=0.0)
    steered = sample_run(run, 2, seed=3, prompt=prompt, negative_prompt="a blue circle", nasa_scale=0.5)
    assert (zero - plain).abs().max() <= 1e-6
    assert (steered - plain).abs().max() > 1e-3
    # any prompt, not only the training prompts the run's embedding cache holds
    assert sample_run(run, 1, seed=3, prompt="a prompt the run never saw").shape == (1, 3, 16, 16)
    out = export(run, tmp_path / "export")
    theirs = sample_export(out, 2, seed=3, prompt=prompt, negative_prompt="a blue circle", nasa_scale=0.5)
    print(f"export vs run with NASA: max diff {(theirs - steered).abs().max().item():.2e}; NASA moved the images by "
          f"{(steered - plain).abs().max().item():.3f}")
    assert theirs.shape == steered.shape and (theirs - steered).abs().max() <= 1e-4

    # the command, through the CLI's entry in-process (as tests/test_bad_input.py; a new interpreter would add its
    # imports, not coverage): the PNG, then bad requests with exit status 2 and one stderr line
    png = tmp_path / "nasa.png"
    capsys.readouterr()
    cli.main(["sample", f"run_dir={tmp_path / 'run'}", "num=2", f"prompt={prompt}", "negative_prompt=a blue circle",
              "nasa_scale=0.5", f"out={png}", "cpu=true"])
    assert png.stat().st_size > 100 and "2 images" in capsys.readouterr().out
    for args, words in ((["nasa_scale=0.5"], "needs a negative prompt"),
                        (["negative_prompt=x", "nasa_scale=-1"], "nasa_scale=-1.0")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as done:
            cli.main(["sample", f"run_dir={tmp_path / 'run'}", f"prompt={prompt}", f"out={png}", *args])
        lines = capsys.readouterr().err.strip().splitlines()
        assert done.value.code == 2 and len(lines) == 1 and words in lines[0], lines
