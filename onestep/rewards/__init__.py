"""Scorers of generated images that evaluation reports and that objectives can use as rewards (they are
differentiable in the images): one file per scorer, each loading its released weights from a local path (nothing is
downloaded).

    imagereward.py   ImageReward (Xu et al. 2023): BLIP ViT-L + BERT text encoder with cross-attention + MLP head
    hpsv2.py         HPSv2 (Wu et al. 2023): open_clip ViT-H-14 fine-tuned on human preferences, cosine score
    diversity.py     diversity of k samples of one prompt: mean pairwise cosine distance in a feature space
    preprocess.py    images in [-1, 1] -> a model's input (short-side resize, center crop, mean/std), in tensors

The official packages (`image-reward`, `hpsv2`) pin timm 0.6.13, pytest 7.2.0 and protobuf < 4, which would
downgrade this project's stack; the scorers are therefore built here on the published architectures from
transformers' BLIP classes and open_clip, and read the released checkpoints' own key layout.
"""
