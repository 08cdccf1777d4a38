"""Figure 1: the pass that feeds every default probe point vs the bare model forward.

Same model (random weights, eval mode), same batch, same precision (float32)
and memory format (channels-last for a model with convolutions, what
``pk.probe`` uses on the CPU). The probekit side is
:func:`probekit.engine.features.extract` over that one batch: the traced graph
(or the forward hooks, for models fx cannot trace) with every reducer applied
right after its point, the finiteness check and the in-memory cache, i.e.
everything ``pk.probe`` does per batch.

Rows: torchvision's ResNet-50 and Inception v3, and two transformers: timm's
ViT-Tiny (224 px, 12 blocks of 197 tokens) and a BERT-like encoder built from
a ``transformers`` config (BERT-mini: 4 layers of 256 hidden units), on token
sequences right-padded with an ``attention_mask``, so that its mask-aware
``mean`` reductions run as in a real run.
"""

from __future__ import annotations

import torch
from torch import nn

from benchmarks.measure import Row, interleave
from benchmarks.workloads import NUM_CLASSES, SIZES, build, images
from probekit.engine import plan
from probekit.engine.devices import wants_channels_last
from probekit.engine.extract import build_extractor
from probekit.engine.features import extract

#: The transformer rows: their input size (pixels for the ViT, tokens for the encoder).
TRANSFORMERS = {"vit_tiny": 224, "bert_mini": 128}
CONFIG = {
    "quick": {"batch": 1, "reps": 1, "models": {"resnet50": 224, "inception_v3": 299}, "transformers": TRANSFORMERS},
    "full": {"batch": 32, "reps": 9, "models": SIZES, "transformers": TRANSFORMERS},
}


def transformer(name: str, size: int, batch: int) -> tuple[nn.Module, object, torch.Tensor]:
    """A transformer with random weights in eval mode, one batch of its inputs and labels.

    ``vit_tiny``: timm's ``vit_tiny_patch16_224`` on ``size`` x ``size`` images; ``bert_mini``:
    ``transformers.BertModel`` (4 layers, 256 hidden, 4 heads) on ``size`` tokens, every other
    sequence right-padded to half its length.
    """
    torch.manual_seed(0)
    if name == "vit_tiny":
        import timm

        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=NUM_CLASSES, img_size=size)
        x, y = images(batch, size)
        return model.eval(), x, y
    if name == "bert_mini":
        from transformers import BertConfig, BertModel

        config = BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
                            max_position_embeddings=max(512, size))
        model = BertModel(config)
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(1000, config.vocab_size, (batch, size), generator=generator)
        mask = torch.ones(batch, size, dtype=torch.long)
        mask[1::2, size // 2:] = 0
        y = torch.arange(batch) % NUM_CLASSES
        return model.eval(), {"input_ids": ids * mask, "attention_mask": mask}, y
    raise ValueError(f"unknown transformer workload {name!r}; use one of {sorted(TRANSFORMERS)}")


def _example(x: object) -> object:
    return {k: v[:2] for k, v in x.items()} if isinstance(x, dict) else x[:2]


def _pair(model: nn.Module, x: object, y: torch.Tensor, batch: int):
    """The bare forward and probekit's extraction of one batch of ``model``, as two callables, and the plan."""
    probe_plan = plan(model, _example(x), num_classes=NUM_CLASSES)
    cpu = torch.device("cpu")
    if wants_channels_last(model, cpu, None):
        model = model.to(memory_format=torch.channels_last)
        if isinstance(x, torch.Tensor) and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
    extractor = build_extractor(probe_plan.graph, probe_plan.reducers)
    dims = {n: r.out_features for n, r in probe_plan.reducers.items()}

    def bare():
        with torch.no_grad():
            return model(**x) if isinstance(x, dict) else model(x)

    def probed():
        return extract(extractor, (x, y), name="valid", dims=dims, num_classes=NUM_CLASSES, batch_size=batch, device=cpu)

    return bare, probed, probe_plan


def extraction_pair(name: str, size: int, batch: int):
    """The bare forward and probekit's extraction of one batch of a workload, as two callables, and the plan."""
    if name in TRANSFORMERS:
        model, x, y = transformer(name, size, batch)
    else:
        model = build(name)
        x, y = images(batch, size)
    return _pair(model, x, y, batch)


def run(size: str) -> list[Row]:
    config = CONFIG[size]
    rows = []
    workloads = [(name, pixels, "px") for name, pixels in config["models"].items()]
    workloads += [(name, length, "px" if name == "vit_tiny" else " tokens") for name, length in config["transformers"].items()]
    for name, pixels, unit in workloads:
        bare, probed, probe_plan = extraction_pair(name, pixels, config["batch"])
        pairs = interleave(bare, probed, reps=config["reps"])
        batch = config["batch"]
        kind = "seq" if unit == " tokens" else "img"
        rows.append(Row(
            figure="1 extraction", case=f"{name} {pixels}{unit}, batch {batch}, {len(probe_plan.layers)} points",
            baseline="bare forward", baseline_value=pairs.baseline_median, probekit_value=pairs.candidate_median,
            unit="s/batch", target=1.15,
            note=f"bare {batch / pairs.baseline_median:.1f} {kind}/s, "
                 f"probekit {batch / pairs.candidate_median:.1f} {kind}/s",
            pair_ratio=pairs.ratio, extra={**pairs.as_dict(), "layers": probe_plan.layers,
                   "reductions": {n: r.describe() for n, r in probe_plan.reducers.items()}},
        ))
    return rows
