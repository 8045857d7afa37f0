"""The opaque conditioning object: null branch, condition dropout, indexing, concatenation, device/dtype moves."""

from __future__ import annotations

import pytest
import torch

from onestep.conditioning import Cond, Labels, as_cond, labels_of


def _text(n=4):
    g = torch.Generator().manual_seed(0)
    fields = {"prompt_embeds": torch.randn(n, 3, 5, generator=g), "pooled_prompt_embeds": torch.randn(n, 5, generator=g),
              "add_time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]]).repeat(n, 1)}
    null = {"prompt_embeds": torch.zeros(1, 3, 5), "pooled_prompt_embeds": torch.zeros(1, 5),
            "add_time_ids": torch.tensor([[16.0, 16, 0, 0, 16, 16]])}
    return Cond(fields, null, texts=[f"p{i}" for i in range(n)], null_text="neg")


def test_null_drop_index_cat():
    c = _text()
    u = c.null()
    assert len(u) == 4 and torch.equal(u["prompt_embeds"], torch.zeros(4, 3, 5)) and u.texts == ["neg"] * 4
    assert c.drop(0.0) is c
    assert torch.equal(c.drop(1.0)["pooled_prompt_embeds"], torch.zeros(4, 5)) and c.drop(1.0).texts == ["neg"] * 4
    torch.manual_seed(1)
    d = c.drop(0.5)
    kept = [i for i in range(4) if d.texts[i] != "neg"]
    assert 0 < len(kept) < 4
    for i in range(4):  # a row is either untouched or the null row, in every field and its text together
        same = torch.equal(d["prompt_embeds"][i], c["prompt_embeds"][i])
        assert same == (i in kept) and torch.equal(d["add_time_ids"][i], c["add_time_ids"][i])
    both = Cond.cat([c, u])
    assert len(both) == 8 and both.texts[4:] == ["neg"] * 4 and torch.equal(both[2:4]["prompt_embeds"], c["prompt_embeds"][2:4])
    picked = c[torch.tensor([3, 0])]
    assert picked.texts == ["p3", "p0"] and torch.equal(picked["pooled_prompt_embeds"][0], c["pooled_prompt_embeds"][3])


def test_labels_and_dtype_moves():
    lab = Labels(torch.tensor([0, 2, 1]), num_classes=3)
    assert lab.null().labels.tolist() == [3, 3, 3]
    assert lab.to(dtype=torch.float16).labels.dtype == torch.long  # labels stay integer
    assert _text().to(dtype=torch.float16)["prompt_embeds"].dtype == torch.float16
    assert labels_of(lab) is lab.labels and labels_of(None) is None
    assert as_cond(torch.tensor([1]), 3).labels.tolist() == [1]
    with pytest.raises(ValueError, match="batch size"):
        Cond({"a": torch.zeros(2), "b": torch.zeros(3)}, {"a": torch.zeros(1), "b": torch.zeros(1)})
    with pytest.raises(Exception, match="text-to-image teacher"):
        labels_of(_text())
