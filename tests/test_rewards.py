"""Preference and diversity scorers (onestep/rewards/) on tiny random models of the released architectures: the
released checkpoints' key layouts load, each score equals a hand computation, the scores are differentiable in the
images, and missing weights are one line. Nothing is downloaded."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from onestep.errors import ConfigError

TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def _tiny_clip(tmp_path, name="onestep-tiny-reward-clip"):
    import open_clip

    cfg = tmp_path / f"{name}.json"
    cfg.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(cfg)
    torch.manual_seed(0)
    return open_clip.create_model(name, pretrained=None).eval(), cfg


# ---- ImageReward -----------------------------------------------------------------------------------------------

def _arch():
    from onestep.rewards.imagereward import Arch

    return Arch(image_size=32, patch_size=16, vision_width=16, vision_layers=2, vision_heads=2, text_width=12,
                text_layers=2, text_heads=3, text_intermediate=20, vocab_size=24, max_positions=40)


def _released_state(a, g: torch.Generator) -> dict[str, torch.Tensor]:
    """A random state dict in the layout of THUDM/ImageReward's ImageReward.pt, written from the official modules:
    BLIP's VisionTransformer (models/vit.py: cls_token, pos_embed, patch_embed.proj, blocks.N.{norm1, attn.qkv,
    attn.proj, norm2, mlp.fc1, mlp.fc2}, norm), med.py's BertModel without pooler (embeddings with the position_ids
    buffer, encoder.layer.N.{attention, crossattention}.{self.{query,key,value}, output.{dense,LayerNorm}},
    intermediate.dense, output.{dense,LayerNorm}), BLIP_Pretrain's vision_proj / text_proj and the MLP head."""
    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    V, T, n = a.vision_width, a.text_width, (a.image_size // a.patch_size) ** 2
    s = {"blip.visual_encoder.cls_token": r(1, 1, V), "blip.visual_encoder.pos_embed": r(1, n + 1, V),
         "blip.visual_encoder.patch_embed.proj.weight": r(V, 3, a.patch_size, a.patch_size),
         "blip.visual_encoder.patch_embed.proj.bias": r(V),
         "blip.visual_encoder.norm.weight": 1 + r(V), "blip.visual_encoder.norm.bias": r(V)}
    for i in range(a.vision_layers):
        b = f"blip.visual_encoder.blocks.{i}."
        s.update({b + "norm1.weight": 1 + r(V), b + "norm1.bias": r(V), b + "attn.qkv.weight": r(3 * V, V),
                  b + "attn.qkv.bias": r(3 * V), b + "attn.proj.weight": r(V, V), b + "attn.proj.bias": r(V),
                  b + "norm2.weight": 1 + r(V), b + "norm2.bias": r(V), b + "mlp.fc1.weight": r(4 * V, V),
                  b + "mlp.fc1.bias": r(4 * V), b + "mlp.fc2.weight": r(V, 4 * V), b + "mlp.fc2.bias": r(V)})
    t = "blip.text_encoder."
    s.update({t + "embeddings.word_embeddings.weight": r(a.vocab_size, T),
              t + "embeddings.position_embeddings.weight": r(a.max_positions, T),
              t + "embeddings.position_ids": torch.arange(a.max_positions)[None],
              t + "embeddings.LayerNorm.weight": 1 + r(T), t + "embeddings.LayerNorm.bias": r(T)})
    for i in range(a.text_layers):
        b = f"{t}encoder.layer.{i}."
        for att, kv in (("attention", T), ("crossattention", V)):
            s.update({f"{b}{att}.self.query.weight": r(T, T), f"{b}{att}.self.query.bias": r(T),
                      f"{b}{att}.self.key.weight": r(T, kv), f"{b}{att}.self.key.bias": r(T),
                      f"{b}{att}.self.value.weight": r(T, kv), f"{b}{att}.self.value.bias": r(T),
                      f"{b}{att}.output.dense.weight": r(T, T), f"{b}{att}.output.dense.bias": r(T),
                      f"{b}{att}.output.LayerNorm.weight": 1 + r(T), f"{b}{att}.output.LayerNorm.bias": r(T)})
        s.update({b + "intermediate.dense.weight": r(a.text_intermediate, T),
                  b + "intermediate.dense.bias": r(a.text_intermediate),
                  b + "output.dense.weight": r(T, a.text_intermediate), b + "output.dense.bias": r(T),
                  b + "output.LayerNorm.weight": 1 + r(T), b + "output.LayerNorm.bias": r(T)})
    s.update({"blip.vision_proj.weight": r(8, V), "blip.vision_proj.bias": r(8), "blip.text_proj.weight": r(8, T),
              "blip.text_proj.bias": r(8)})
    for i, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), ((T, 1024), (1024, 128), (128, 64), (64, 16), (16, 1))):
        s.update({f"mlp.layers.{i}.weight": r(fan_out, fan_in) / math.sqrt(fan_in), f"mlp.layers.{i}.bias": r(fan_out)})
    return s


def _attention(q, k, v, heads, mask=None):
    b, n, d = q.shape
    split = [x.reshape(b, x.shape[1], heads, d // heads).transpose(1, 2) for x in (q, k, v)]
    scores = split[0] @ split[1].transpose(-1, -2) / math.sqrt(d // heads)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :].bool(), float("-inf"))
    return (scores.softmax(-1) @ split[2]).transpose(1, 2).reshape(b, n, d)


def _hand_reward(s, a, pixels, ids, mask):
    """ImageReward.score transcribed: BLIP's ViT, med.py's BERT with cross-attention, the MLP, the normalization."""
    from onestep.rewards.imagereward import MEAN, STD

    def lin(x, p):
        return x @ s[p + ".weight"].T + s[p + ".bias"]

    def ln(x, p, eps):
        return F.layer_norm(x, x.shape[-1:], s[p + ".weight"], s[p + ".bias"], eps)

    v = "blip.visual_encoder."
    x = F.conv2d(pixels, s[v + "patch_embed.proj.weight"], s[v + "patch_embed.proj.bias"], stride=a.patch_size)
    x = torch.cat([s[v + "cls_token"].expand(x.shape[0], -1, -1), x.flatten(2).transpose(1, 2)], 1)
    x = x + s[v + "pos_embed"]
    for i in range(a.vision_layers):
        b = f"{v}blocks.{i}."
        q, k, val = lin(ln(x, b + "norm1", 1e-6), b + "attn.qkv").chunk(3, dim=-1)
        x = x + lin(_attention(q, k, val, a.vision_heads), b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "norm2", 1e-6), b + "mlp.fc1")), b + "mlp.fc2")
    image = ln(x, v + "norm", 1e-6)

    t = "blip.text_encoder."
    h = s[t + "embeddings.word_embeddings.weight"][ids] + s[t + "embeddings.position_embeddings.weight"][:ids.shape[1]]
    h = ln(h, t + "embeddings.LayerNorm", 1e-12)
    for i in range(a.text_layers):
        b = f"{t}encoder.layer.{i}."
        for att, kv, m in (("attention", h, mask), ("crossattention", image, None)):
            p = f"{b}{att}."
            ctx = _attention(lin(h, p + "self.query"), lin(kv, p + "self.key"), lin(kv, p + "self.value"),
                             a.text_heads, m)
            h = ln(lin(ctx, p + "output.dense") + h, p + "output.LayerNorm", 1e-12)
        ff = lin(F.gelu(lin(h, b + "intermediate.dense")), b + "output.dense")
        h = ln(ff + h, b + "output.LayerNorm", 1e-12)
    r = h[:, 0]
    for i in (0, 2, 4, 6, 7):
        r = lin(r, f"mlp.layers.{i}")
    return ((r - MEAN) / STD).squeeze(-1)


def _tokenizer_folder(tmp_path):
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "photo", "of", "cat", "digit", "seven", "the",
             "blue", "dog", "two", "on", "grass", "big", "small", "##s", "tree"]  # 22 + [DEC], [ENC] = vocab 24
    folder = tmp_path / "bert-tiny"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    return folder


def test_imagereward_reads_the_released_layout_and_equals_a_hand_computation(tmp_path):
    from onestep.rewards.imagereward import MAX_TOKENS, ImageReward

    a = _arch()
    state = _released_state(a, torch.Generator().manual_seed(0))
    ckpt = tmp_path / "ImageReward.pt"
    torch.save(state, ckpt)
    model = ImageReward.load(ckpt, _tokenizer_folder(tmp_path), a)
    assert len(model.tokenizer) == a.vocab_size  # bert's vocabulary + BLIP's [DEC], [ENC]

    images = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1
    prompts = ["a red cat", "the digit seven on grass", "a photo of a big blue dog tree"]
    got = model(images, prompts)
    tokens = model.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS,
                             return_tensors="pt")
    assert tokens.input_ids.shape == (3, MAX_TOKENS) and int(tokens.attention_mask[0].sum()) == 5  # [CLS] a red cat [SEP]
    from onestep.rewards.preprocess import to_model_input

    pixels = to_model_input(images, a.image_size)
    with torch.no_grad():
        want = _hand_reward({k: v.double() for k, v in state.items()}, a, pixels.double(), tokens.input_ids,
                            tokens.attention_mask)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    assert got.shape == (3,) and got.std() > 0

    x = images.clone().requires_grad_(True)  # a reward: differentiable in the images
    model(x, prompts).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_imagereward_bad_weights_are_one_line(tmp_path):
    from onestep.rewards.imagereward import ImageReward

    a, tok = _arch(), _tokenizer_folder(tmp_path)
    with pytest.raises(ConfigError, match="eval.rewards.imagereward=<local file>"):
        ImageReward.load(None, tok, a)
    with pytest.raises(ConfigError, match="does not exist"):
        ImageReward.load(tmp_path / "missing.pt", tok, a)
    state = _released_state(a, torch.Generator().manual_seed(0))
    torch.save(state, tmp_path / "ok.pt")
    with pytest.raises(ConfigError, match="eval.rewards.imagereward_tokenizer"):
        ImageReward.load(tmp_path / "ok.pt", tmp_path, a)
    for broken, match in (({k: v for k, v in state.items() if "blocks.1.attn.qkv" not in k}, "do not fit"),
                          ({**state, "blip.visual_encoder.head.weight": state["blip.vision_proj.weight"]},
                           "not a key of BLIP's ViT"),
                          ({**state, "itm_head.weight": state["blip.vision_proj.weight"]}, "not a key of ImageReward")):
        torch.save(broken, tmp_path / "bad.pt")
        with pytest.raises(ConfigError, match=match) as e:
            ImageReward.load(tmp_path / "bad.pt", tok, a)
        assert "\n" not in str(e.value)


# ---- HPSv2 -----------------------------------------------------------------------------------------------------

def test_hpsv2_score_is_the_cosine_of_the_official_scorer(tmp_path):
    import open_clip

    from onestep.rewards.hpsv2 import HPSv2
    from onestep.rewards.preprocess import to_model_input

    model, cfg = _tiny_clip(tmp_path)
    ckpt = tmp_path / "HPS_v2_compressed.pt"
    # the released file: {"state_dict": open_clip keys}, here as saved from DistributedDataParallel
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    scorer = HPSv2(ckpt, str(cfg))
    images = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    prompts = ["a photo of a cat", "a red square", "the digit seven"]
    got = scorer(images, prompts)
    with torch.no_grad():  # img_score.py: diag(image_features @ text_features.T), normalized features
        out = model(to_model_input(images, 32), open_clip.get_tokenizer("onestep-tiny-reward-clip")(prompts))
        want = torch.diagonal(out["image_features"] @ out["text_features"].T) if isinstance(out, dict) else \
            torch.diagonal(out[0] @ out[1].T)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert got.abs().max() <= 1

    x = images.clone().requires_grad_(True)
    scorer(x, prompts).sum().backward()
    assert x.grad.abs().sum() > 0

    with pytest.raises(ConfigError, match="eval.rewards.hpsv2=<local file>"):
        HPSv2(None, str(cfg))
    torch.save({"state_dict": {"visual.proj": torch.zeros(1)}}, tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match="does not fit the open_clip architecture") as e:
        HPSv2(tmp_path / "bad.pt", str(cfg))
    assert "\n" not in str(e.value)


def test_hpsv2_default_architecture_has_the_released_key_layout():
    """The released HPS_v2*.pt hold open_clip ViT-H-14 keys (the official fork of open_clip names them alike): the
    default architecture built here has those names (built on the meta device: no memory, no download)."""
    import open_clip

    from onestep.rewards.hpsv2 import MODEL

    with torch.device("meta"):
        keys = set(open_clip.CLIP(**open_clip.get_model_config(MODEL)).state_dict())
    assert {"visual.class_embedding", "visual.conv1.weight", "visual.transformer.resblocks.31.attn.in_proj_weight",
            "visual.proj", "transformer.resblocks.23.mlp.c_fc.weight", "token_embedding.weight", "text_projection",
            "logit_scale", "ln_final.weight"} <= keys
    assert not any(k.startswith("visual.transformer.resblocks.32.") for k in keys)  # ViT-H: 32 vision blocks


# ---- diversity --------------------------------------------------------------------------------------------------

def test_diversity_is_the_mean_pairwise_cosine_distance_per_prompt():
    from onestep.rewards.diversity import diversity, pairwise_cosine_distance, per_prompt

    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0])
    assert float(pairwise_cosine_distance(torch.stack([e1, e1, 2 * e1]))) == pytest.approx(0, abs=1e-12)
    # pairs (e1, e1) = 0, (e1, e2) = 1 twice: 2/3; opposite vectors: 2
    assert float(pairwise_cosine_distance(torch.stack([e1, e1, e2]))) == pytest.approx(2 / 3)
    assert float(pairwise_cosine_distance(torch.stack([e1, -e1]))) == pytest.approx(2)
    feats = torch.stack([e1, e1, e1, e2, e1])
    prompts = ["same", "same", "mixed", "mixed", "alone"]
    assert per_prompt(feats, prompts) == {"same": pytest.approx(0), "mixed": pytest.approx(1)}
    assert diversity(feats, prompts) == {"diversity_prompts": 2, "diversity": pytest.approx(0.5)}
    assert diversity(feats, ["a", "b", "c", "d", "e"]) == {"diversity_prompts": 0}


def test_clip_image_diversity_zero_for_identical_samples_positive_otherwise(tmp_path):
    from onestep.rewards.diversity import ClipImageFeatures, diversity

    model, cfg = _tiny_clip(tmp_path, "onestep-tiny-diversity-clip")
    torch.save(model.state_dict(), tmp_path / "clip.pt")
    features = ClipImageFeatures(str(cfg), tmp_path / "clip.pt")
    g = torch.Generator().manual_seed(3)
    one = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    same = features(one.expand(4, -1, -1, -1))
    assert diversity(same, ["p"] * 4)["diversity"] == pytest.approx(0, abs=1e-6)
    varied = features(torch.rand(4, 3, 32, 32, generator=g) * 2 - 1)
    assert diversity(varied, ["p"] * 4)["diversity"] > 1e-4
    with pytest.raises(ConfigError, match="eval.clip.checkpoint"):
        ClipImageFeatures(str(cfg), None)


# ---- in evaluation: eval.rewards ---------------------------------------------------------------------------------

def test_eval_rewards_report_hpsv2_and_clip_diversity_and_need_their_weights(tmp_path):
    from conftest import compose
    from onestep.eval.preference import PreferenceScores
    from onestep.rewards.diversity import ClipImageFeatures, diversity
    from onestep.rewards.hpsv2 import HPSv2

    model, cfg = _tiny_clip(tmp_path, "onestep-tiny-pref-clip")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "hps.pt")
    torch.save(model.state_dict(), tmp_path / "clip.pt")
    ev = compose(["experiment=digits_t2i_dmd2", f"eval.rewards.hpsv2={tmp_path / 'hps.pt'}",
                  f"eval.rewards.hpsv2_model={cfg}", "eval.rewards.diversity=true", f"eval.clip.model={cfg}",
                  f"eval.clip.checkpoint={tmp_path / 'clip.pt'}"]).eval
    scores = PreferenceScores(ev)
    assert [p.split(" ")[0] for p in scores.parts] == ["HPSv2", "diversity"]
    images = torch.rand(20, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1  # > one scorer batch
    prompts = ["a cat", "a dog"] * 10
    got = scores.metrics(images, prompts)
    assert got["hpsv2"] == pytest.approx(float(HPSv2(tmp_path / "hps.pt", str(cfg))(images, prompts).mean()), rel=1e-5)
    want = diversity(ClipImageFeatures(str(cfg), tmp_path / "clip.pt")(images), prompts)
    assert got["diversity_prompts"] == 2 and got["diversity"] == pytest.approx(want["diversity"], rel=1e-5)
    assert not PreferenceScores(compose(["experiment=digits_t2i_dmd2"]).eval)  # nothing configured: no scores

    with pytest.raises(ConfigError, match="eval.rewards.diversity=true .* eval.clip.checkpoint"):
        PreferenceScores(compose(["experiment=digits_t2i_dmd2", "eval.rewards.diversity=true"]).eval)
    with pytest.raises(ConfigError, match="eval.rewards.imagereward '.*' does not exist"):
        PreferenceScores(compose(["experiment=digits_t2i_dmd2", f"eval.rewards.imagereward={tmp_path / 'no.pt'}"]).eval)
