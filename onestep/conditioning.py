"""Conditioning: one opaque object made by the data source and consumed by the teacher adapter.

A ``Cond`` is a batch of named tensors (batch dimension first) plus the *null* row that stands for "no
condition" (the class label ``num_classes``, or the encoded negative / empty prompt), and optionally one
text per row (the prompts, for CLIP score and sample grids). Everything above the denoisers treats it as
opaque: classifier-free guidance asks for ``null()``, condition dropout for ``drop(p)``, evaluation chunks
it with indexing and ``cat``; only a teacher adapter reads its fields.

    Labels(labels, num_classes)                        class-conditional models (GMM, digits)
    Cond({"prompt_embeds": ..., "pooled_prompt_embeds": ..., "add_time_ids": ...},
         null={...same keys, batch 1...}, texts=[...])  text-to-image adapters (denoisers/sd.py)
"""

from __future__ import annotations

from typing import Sequence

import torch

from onestep.errors import ConfigError


class Cond:
    def __init__(self, fields: dict[str, torch.Tensor], null: dict[str, torch.Tensor],
                 texts: Sequence[str] | None = None, null_text: str = ""):
        sizes = {k: v.shape[0] for k, v in fields.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"conditioning fields disagree on the batch size: {sizes}")
        if set(null) != set(fields) or any(v.shape[0] != 1 for v in null.values()):
            raise ValueError(f"the null condition needs one row of every field {sorted(fields)}, got "
                             f"{ {k: tuple(v.shape) for k, v in null.items()} }")
        self.fields, self.null_fields = dict(fields), dict(null)
        self.texts = None if texts is None else list(texts)
        self.null_text = null_text
        if self.texts is not None and len(self.texts) != len(self):
            raise ValueError(f"{len(self.texts)} texts for a conditioning batch of {len(self)}")

    def __len__(self) -> int:
        return next(iter(self.fields.values())).shape[0]

    def __getitem__(self, key):
        """``cond["prompt_embeds"]`` is a field; anything else (slice, index tensor, list) selects rows."""
        return self.fields[key] if isinstance(key, str) else self.select(key)

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def _like(self, fields: dict[str, torch.Tensor], texts, null=None) -> "Cond":
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        out.fields, out.texts = fields, texts
        if null is not None:
            out.null_fields = null
        return out

    def null(self, n: int | None = None) -> "Cond":
        """The unconditional branch of CFG: ``n`` (default len(self)) copies of the null row."""
        n = len(self) if n is None else n
        fields = {k: v.expand(n, *v.shape[1:]).clone() for k, v in self.null_fields.items()}
        dev = next(iter(self.fields.values())).device
        return self._like({k: v.to(dev) for k, v in fields.items()}, None if self.texts is None else [self.null_text] * n)

    def drop(self, p: float) -> "Cond":
        """Condition dropout: each row becomes the null row with probability p (torch's global RNG)."""
        if p <= 0:
            return self
        dev = next(iter(self.fields.values())).device
        mask = torch.rand(len(self), device=dev) < p
        fields = {}
        for k, v in self.fields.items():
            m = mask.view(-1, *([1] * (v.ndim - 1)))
            fields[k] = torch.where(m, self.null_fields[k].to(v), v)
        texts = None if self.texts is None else [self.null_text if d else s for s, d in zip(self.texts, mask.tolist())]
        return self._like(fields, texts)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Cond":
        """Moves every field; ``dtype`` casts floating-point fields only (labels and masks stay integer)."""
        def mv(v):
            return v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else None)
        return self._like({k: mv(v) for k, v in self.fields.items()}, self.texts,
                          {k: mv(v) for k, v in self.null_fields.items()})

    def select(self, idx) -> "Cond":
        """Rows ``idx`` (a slice, an index tensor or a list of indices)."""
        if isinstance(idx, slice):
            texts = None if self.texts is None else self.texts[idx]
        else:
            idx = torch.as_tensor(idx, dtype=torch.long)
            texts = None if self.texts is None else [self.texts[i] for i in idx.tolist()]
        fields = {k: v[idx.to(v.device) if isinstance(idx, torch.Tensor) else idx] for k, v in self.fields.items()}
        return self._like(fields, texts)

    @staticmethod
    def cat(conds: Sequence["Cond"]) -> "Cond":
        first = conds[0]
        if any(type(c) is not type(first) or set(c.fields) != set(first.fields) for c in conds):
            raise ValueError("only conditioning of the same kind and fields can be concatenated")
        fields = {k: torch.cat([c.fields[k] for c in conds]) for k in first.fields}
        texts = None if any(c.texts is None for c in conds) else [s for c in conds for s in c.texts]
        return first._like(fields, texts)

    @staticmethod
    def of_classes(labels: torch.Tensor | None, num_classes: int, device=None) -> "Cond | None":
        """The conditioning of stored class labels (a pool of teacher samples, a checkpointed buffer): Labels on
        ``device``, or None for an unconditional model (``num_classes`` 0) or no labels; objectives rebuild their
        pools' conditions through this and never name the conditioning's type."""
        if labels is None or not num_classes:
            return None
        return Labels(labels, num_classes).to(device)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.fields.items())
        return f"{type(self).__name__}({shapes})"


class Labels(Cond):
    """Class labels; label ``num_classes`` is "no label" (what label dropout trains and CFG feeds)."""

    def __init__(self, labels: torch.Tensor, num_classes: int):
        labels = torch.as_tensor(labels).long()
        super().__init__({"labels": labels}, {"labels": torch.full((1,), num_classes, dtype=torch.long)})
        self.num_classes = num_classes

    @property
    def labels(self) -> torch.Tensor:
        return self.fields["labels"]


def as_cond(cond, num_classes: int = 0) -> Cond | None:
    """A Cond from what a caller passed: None, a Cond, or (for class-conditional models) a label tensor."""
    if cond is None or isinstance(cond, Cond):
        return cond
    if isinstance(cond, torch.Tensor) and num_classes:
        return Labels(cond, num_classes)
    raise ConfigError(f"conditioning of type {type(cond).__name__} is not understood here; pass a "
                      "onestep.conditioning.Cond (class labels: Labels(labels, num_classes))")


def labels_of(cond) -> torch.Tensor | None:
    """The class-label tensor of a class-conditional batch (None when unconditional)."""
    if cond is None or isinstance(cond, torch.Tensor):
        return cond
    if isinstance(cond, Labels):
        return cond.labels
    raise ConfigError(f"this model takes class labels but got {cond!r}; pick a teacher that matches the data "
                      "(text conditioning needs a text-to-image teacher such as teacher=sd15)")


def cat(conds: Sequence) -> Cond | torch.Tensor | None:
    """Concatenate a list of batches' conditioning (None stays None; raw label tensors are concatenated)."""
    if conds[0] is None:
        return None
    if isinstance(conds[0], torch.Tensor):
        return torch.cat(list(conds))
    return Cond.cat(conds)


def select(cond, idx):
    """Rows ``idx`` of a Cond or a label tensor (None stays None)."""
    if cond is None:
        return None
    return cond[idx]
