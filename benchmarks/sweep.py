"""The model sweep: models nobody here wrote, each listed, probed end to end and checked left as found.

Eight timm models (CNNs and ViTs, at 32 x 32 pixels) and five Hugging Face
transformers architectures (BERT, GPT-2, ViT, DistilBERT, RoBERTa), all
with random weights from configs (nothing is downloaded), each on a tiny
synthetic task whose labels are computed from the inputs:

- images: the class is the channel with the largest mean (one channel
  carries a planted offset);
- token sequences: right-padded to a common length with an
  ``attention_mask``; the class is the band of token ids most of a
  sequence's real tokens fall in.

``tests/zoo/test_sweep.py`` runs every :data:`CASES` entry under test; run
this module to print the table (model | default points | seconds | state
unchanged)::

    .venv/bin/python -m benchmarks.sweep            # every model
    .venv/bin/python -m benchmarks.sweep --only bert,timm:resnet18

The seconds are one ``list_layers`` plus one ``pk.probe`` with the default
points (fixed ``l2``, a feature budget of 1,024), on whatever the machine
has free: a figure, never a test.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["CASES", "Case", "changed", "image_task", "main", "run_case", "state_of", "text_task"]

N_TRAIN, N_VALID, CLASSES = 64, 32, 3
IMAGE_SIZE, SEQ_LEN, VOCAB = 32, 16, 60
#: A fixed probe L2 and a smaller feature budget keep the sweep about the models, not the L2 path (a figure of its own).
L2, BUDGET = 1e-3, 1024


# ----------------------------------------------------------------------------- synthetic tasks
def image_task(n: int, *, seed: int, size: int = IMAGE_SIZE, classes: int = CLASSES) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` 3-channel images; the label is the channel with the largest mean (one carries a +1 offset)."""
    generator = torch.Generator().manual_seed(seed)
    planted = torch.arange(n) % classes
    x = torch.randn(n, 3, size, size, generator=generator)
    x[torch.arange(n), planted] += 1.0
    return x, x.mean((2, 3)).argmax(1)


def text_task(n: int, *, seed: int, length: int = SEQ_LEN, vocab: int = VOCAB,
              classes: int = CLASSES) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``n`` right-padded token sequences (id 0 is padding) and the band of ids most of their real tokens are in."""
    generator = torch.Generator().manual_seed(seed)
    band = (vocab - 1) // classes
    planted = torch.arange(n) % classes
    lengths = torch.randint(length // 2, length + 1, (n,), generator=generator)
    in_band = 1 + planted[:, None] * band + torch.randint(0, band, (n, length), generator=generator)
    anywhere = torch.randint(1, 1 + classes * band, (n, length), generator=generator)
    ids = torch.where(torch.rand(n, length, generator=generator) < 0.6, in_band, anywhere)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    counts = torch.stack([(((ids - 1) // band == c) & (mask == 1)).sum(1) for c in range(classes)], 1)
    return {"input_ids": ids, "attention_mask": mask}, counts.argmax(1)


# ----------------------------------------------------------------------------- models
def _timm(name: str, **kwargs) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=CLASSES, **kwargs)
    return build


def _hf(model_class: str, config_class: str, **config) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        return getattr(transformers, model_class)(getattr(transformers, config_class)(**config))
    return build


_TINY_TEXT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                  max_position_embeddings=SEQ_LEN + 4)


@dataclass(frozen=True)
class Case:
    """One model of the sweep: how to build it, its task, and the block points its defaults must hold."""

    name: str
    build: Callable[[], nn.Module]
    task: Callable[..., tuple[object, torch.Tensor]]
    blocks: Callable[[nn.Module], list[str]]
    """The model's repeated blocks, read from its structure: each must be a default point."""
    kind: str  # "image" or "text"
    layout: str
    """The layout of its blocks' outputs: "map" (channels first) or "tokens" (tokens x hidden)."""


def _stages(model: nn.Module, path: str, inner: str = "", *, alternative: str | None = None) -> list[str]:
    """``path.i`` (or ``path.i.inner.j``) for every child of a container (and of each child's ``inner`` container)."""
    if alternative and not hasattr(model, path.split(".")[0]):
        path = alternative  # transformers 5 renamed ViT's encoder.layer to layers
    names = []
    for i, child in model.get_submodule(path).named_children():
        if not inner:
            names.append(f"{path}.{i}")
            continue
        names.extend(f"{path}.{i}.{inner}.{j}" for j, _ in child.get_submodule(inner).named_children())
    return names


def _nested(model: nn.Module, path: str) -> list[str]:
    """``path.i.j``: the blocks of each stage of a container of stages (timm's EfficientNet and MobileNet)."""
    return [f"{path}.{i}.{j}" for i, stage in model.get_submodule(path).named_children() for j, _ in stage.named_children()]


def _regnet(model: nn.Module) -> list[str]:
    return [f"{s}.{b}" for s in ("s1", "s2", "s3", "s4") for b, _ in model.get_submodule(s).named_children()]


def _densenet(model: nn.Module) -> list[str]:
    return [f"features.denseblock{k}" for k in range(1, 5)] + [f"features.transition{k}" for k in range(1, 4)]


CASES: list[Case] = [
    Case("timm:resnet18", _timm("resnet18"), image_task,
         lambda m: [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)], "image", "map"),
    Case("timm:efficientnet_b0", _timm("efficientnet_b0"), image_task, lambda m: _nested(m, "blocks"), "image", "map"),
    Case("timm:mobilenetv3_small_100", _timm("mobilenetv3_small_100"), image_task, lambda m: _nested(m, "blocks"), "image",
         "map"),
    Case("timm:regnetx_002", _timm("regnetx_002"), image_task, _regnet, "image", "map"),
    Case("timm:densenet121", _timm("densenet121"), image_task, _densenet, "image", "map"),
    Case("timm:convnext_atto", _timm("convnext_atto"), image_task, lambda m: _stages(m, "stages", "blocks"), "image",
         "map"),
    Case("timm:vit_tiny_patch16_224", _timm("vit_tiny_patch16_224", img_size=IMAGE_SIZE, patch_size=8), image_task,
         lambda m: _stages(m, "blocks"), "image", "tokens"),
    Case("timm:deit_tiny_patch16_224", _timm("deit_tiny_patch16_224", img_size=IMAGE_SIZE, patch_size=8), image_task,
         lambda m: _stages(m, "blocks"), "image", "tokens"),
    Case("transformers:BertModel", _hf("BertModel", "BertConfig", **_TINY_TEXT), text_task,
         lambda m: _stages(m, "encoder.layer"), "text", "tokens"),
    Case("transformers:GPT2Model", _hf("GPT2Model", "GPT2Config", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2,
                                       n_positions=SEQ_LEN + 4), text_task, lambda m: _stages(m, "h"), "text", "tokens"),
    Case("transformers:ViTModel", _hf("ViTModel", "ViTConfig", image_size=IMAGE_SIZE, patch_size=8, hidden_size=32,
                                      num_hidden_layers=2, num_attention_heads=2, intermediate_size=64), image_task,
         lambda m: _stages(m, "encoder.layer", alternative="layers"), "image", "tokens"),
    Case("transformers:DistilBertModel", _hf("DistilBertModel", "DistilBertConfig", vocab_size=VOCAB, dim=32, n_layers=2,
                                             n_heads=2, hidden_dim=64, max_position_embeddings=SEQ_LEN + 4), text_task,
         lambda m: _stages(m, "transformer.layer"), "text", "tokens"),
    Case("transformers:RobertaModel", _hf("RobertaModel", "RobertaConfig", **{**_TINY_TEXT, "pad_token_id": 0,
                                                                            "max_position_embeddings": SEQ_LEN + 4}),
         text_task, lambda m: _stages(m, "encoder.layer"), "text", "tokens"),
]


def data_for(case: Case) -> dict[str, tuple[object, torch.Tensor]]:
    """The case's train and valid splits, as ``(inputs, labels)`` pairs (a mapping of tensors for text models)."""
    return {"train": case.task(N_TRAIN, seed=0), "valid": case.task(N_VALID, seed=1)}


def example_of(inputs: object, n: int = 2) -> object:
    """The first ``n`` examples of a split's inputs."""
    return {k: v[:n] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[:n]


# ----------------------------------------------------------------------------- the model left as found
def state_of(model: nn.Module) -> dict[str, object]:
    """Every parameter and buffer (values, dtype, device, memory format, requires_grad), every module's training flag."""
    state: dict[str, object] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        state[f"param {name}"] = (param.detach().clone(), param.requires_grad)
    for name, buffer in model.named_buffers(remove_duplicate=False):
        state[f"buffer {name}"] = buffer.detach().clone() if buffer is not None else None
    for name, module in model.named_modules(remove_duplicate=False):
        state[f"training {name or '(model)'}"] = module.training
    return state


def _layout(t: torch.Tensor) -> tuple[int, ...]:
    """The strides of the dims longer than 1: the memory format (a size-1 dim's stride means nothing)."""
    return tuple(stride for stride, size in zip(t.stride(), t.shape) if size > 1)


def _same(a: object, b: object) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return (a.dtype == b.dtype and a.device == b.device and a.shape == b.shape
                and _layout(a) == _layout(b) and torch.equal(a, b))
    return type(a) is type(b) and a == b


def changed(before: dict[str, object], after: dict[str, object]) -> list[str]:
    """The entries of two :func:`state_of` snapshots that differ, bit for bit (added or removed ones too)."""
    return sorted(k for k in before.keys() | after.keys() if k not in before or k not in after or not _same(before[k], after[k]))


# ----------------------------------------------------------------------------- one case
@dataclass
class Result:
    name: str
    listed: object  # list_layers' DataFrame
    run: object  # the probe's xarray.Dataset
    blocks: list[str]
    seconds: float
    changes: list[str]


def run_case(case: Case, *, seed: int = 0) -> Result:
    """Build the model (train mode, as built), list its layers, probe its default points, and diff its state."""
    import probekit as pk

    torch.manual_seed(seed)
    model = case.build()
    splits = data_for(case)
    before = state_of(model)
    start = time.perf_counter()
    listed = pk.list_layers(model, example_of(splits["train"][0]))
    run = pk.probe(model, splits, num_classes=CLASSES, quiet=True, seed=seed, model_name=case.name, dataset_name=case.kind,
                   l2=L2, budget=BUDGET)
    seconds = time.perf_counter() - start
    return Result(case.name, listed, run, case.blocks(model), seconds, changed(before, state_of(model)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated model names, or parts of them (e.g. bert,resnet18)")
    args = parser.parse_args(argv)
    cases = CASES
    if args.only:
        wanted = [w.strip().lower() for w in args.only.split(",") if w.strip()]
        cases = [c for c in CASES if any(w in c.name.lower() for w in wanted)]
        if not cases:
            print(f"no model of the sweep matches {args.only!r}; they are: {', '.join(c.name for c in CASES)}", file=sys.stderr)
            return 2
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    rows = []
    width = max(len(c.name) for c in cases)
    print(f"{'model':<{width}} | default points | blocks present | seconds | state unchanged")
    failed = 0
    for case in cases:
        try:
            result = run_case(case)
        except Exception as error:  # the table goes on; the test (tests/zoo/test_sweep.py) shows the traceback
            failed += 1
            print(f"{case.name:<{width}} | failed: {type(error).__name__}: {' '.join(str(error).split())[:200]}", flush=True)
            continue
        layers = [str(n) for n in result.run.layer.values]
        present = sum(b in layers for b in result.blocks)
        unchanged = "yes" if not result.changes else f"no ({len(result.changes)}: {', '.join(result.changes[:3])})"
        rows.append((case.name, len(layers), f"{present}/{len(result.blocks)}", result.seconds, unchanged))
        print(f"{case.name:<{width}} | {len(layers):>14} | {rows[-1][2]:>14} | {result.seconds:7.3f} | {unchanged}", flush=True)
    print(f"{len(rows)} models, {sum(r[3] for r in rows):.1f} s in all" + (f"; {failed} failed" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
