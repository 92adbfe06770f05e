"""Multi-GPU and multi-node training on Lightning's own strategies: what FSDP shards as one unit.

`trainer=ddp` and `trainer=fsdp` (conf/trainer/) choose the strategy; `BlockWrapPolicy` is FSDP's
`auto_wrap_policy` (and, optionally, its `activation_checkpointing_policy`) for any model this framework builds.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.fsdp.wrap import _Policy

from text2img.generators.gan_blocks import DownBlock, ModulatedUpBlock

# Our own repeated blocks (the GAN's generator and discriminator); transformers and diffusers models name theirs.
OWN_BLOCKS = (ModulatedUpBlock, DownBlock)


def block_class_names(root: nn.Module) -> set[str]:
    """Class names of the repeated blocks of every pretrained-style model inside `root`.

    transformers and diffusers models list the blocks that must stay whole on one device in `_no_split_modules`
    (SmolLM2: LlamaDecoderLayer; MiniLM: BertLayer, BertEmbeddings; the UNet: ResnetBlock2D,
    BasicTransformerBlock and its up blocks), the same list Accelerate's FSDP plugin wraps. A transformers model
    without one contributes the class of its stack of `config.num_hidden_layers` layers.
    """
    names: set[str] = set()
    for module in root.modules():
        declared = getattr(module, "_no_split_modules", None)
        if declared:
            names.update(declared)
            continue
        layers = getattr(getattr(module, "config", None), "num_hidden_layers", None)
        if isinstance(layers, int):
            for stack in module.modules():
                if isinstance(stack, nn.ModuleList) and len(stack) == layers:
                    names.update(type(layer).__name__ for layer in stack)
    return names


def _params_outside(module: nn.Module, units: set[nn.Module]) -> Iterator[nn.Parameter]:
    """The parameters of `module` that no unit nested in it holds (what its own FSDP unit would flatten)."""
    yield from module.parameters(recurse=False)
    for child in module.children():
        if child not in units:
            yield from _params_outside(child, units)


def _split_dtypes(unit: nn.Module, units: set[nn.Module], root: bool = False) -> list[nn.Module]:
    """Submodules to make units of so that `unit` holds parameters of one dtype only.

    FSDP flattens a unit's parameters into one tensor, so they must share a dtype; models here mix them on
    purpose (a bfloat16 first stage in a float32 generator, float32 LoRA adapters on a bfloat16 LLM). The
    dtype of the unit's own parameters stays (they cannot move); else, for the `root` (the LightningModule), the
    dtype of most of its trained elements (the model's training dtype), else the one holding most elements; each
    largest subtree holding only other dtypes becomes a unit.
    """
    sizes: dict[torch.dtype, int] = {}
    trained: dict[torch.dtype, int] = {}
    for parameter in _params_outside(unit, units):
        sizes[parameter.dtype] = sizes.get(parameter.dtype, 0) + parameter.numel()
        if parameter.requires_grad:
            trained[parameter.dtype] = trained.get(parameter.dtype, 0) + parameter.numel()
    if len(sizes) < 2:
        return []
    own = [parameter.dtype for parameter in unit.parameters(recurse=False)]
    counts = trained if root and trained else sizes
    majority = own[0] if own else max(counts, key=counts.__getitem__)
    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if child in units:
                continue
            dtypes = {parameter.dtype for parameter in _params_outside(child, units)}
            if dtypes and majority not in dtypes:
                found.append(child)
            elif len(dtypes) > 1:
                visit(child)

    visit(unit)
    return found


class BlockWrapPolicy(_Policy):
    """FSDP wraps (shards and gathers as one unit) each repeated block of the model: the language model's
    layers, the UNet's ResNet and transformer blocks, the GAN's blocks (`block_class_names`, `OWN_BLOCKS`).

    With `split_dtypes`, parts whose weights are in another dtype than their surroundings become units of their
    own, as FSDP requires (see `_split_dtypes`). For activation checkpointing (checkpoint each block, not
    those parts) pass `split_dtypes=False`.
    """

    def __init__(self, split_dtypes: bool = True) -> None:
        super().__init__()
        self.split_dtypes = split_dtypes

    def units(self, root: nn.Module) -> list[nn.Module]:
        """The submodules of `root` to wrap, in `root.modules()` order (the root itself is always wrapped)."""
        names = block_class_names(root)
        units = {
            module for module in root.modules()
            if module is not root and (type(module).__name__ in names or isinstance(module, OWN_BLOCKS))
        }
        if self.split_dtypes:
            pending = [root, *units]
            while pending:
                unit = pending.pop()
                split = _split_dtypes(unit, units, root=unit is root)
                units.update(split)
                pending.extend(split)
        return [module for module in root.modules() if module in units]

    def _run_policy(
        self, root_module: nn.Module, ignored_modules: set[nn.Module], root_kwargs: dict[str, Any]
    ) -> dict[nn.Module, dict[str, Any]]:
        return {module: dict(root_kwargs) for module in self.units(root_module) if module not in ignored_modules}


def sum_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over every process of a running torch.distributed job (itself outside one), on its
    device: one all-reduce, no host copy. Lightning's `strategy.reduce` and `self.log(..., sync_dist=True)` put a
    `barrier()` before their all-reduce, and an NCCL barrier waits on the host for the GPU's queue to drain."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tensor
    if torch.distributed.get_world_size() == 1:
        return tensor
    tensor = tensor.clone()
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def mean_over_processes(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of `tensor` over the processes (see `sum_over_processes`), e.g. a logged loss: the global batch's."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tensor
    return sum_over_processes(tensor.detach().float()) / torch.distributed.get_world_size()
