"""LoRA (Hu et al. 2021) on the text encoder and the generators, with peft's functional API.

`add_lora(module, settings, option)` injects the adapters into `module` and freezes everything else in it;
the module stays a plain transformers/diffusers module, with peft's wrapper layers at the targeted names.
Which module to pass: the text encoder's `encoder.model`, and for a generator `generator.lora_module()`
(the UNet of diffusion and latent diffusion, the GAN's generator network, the whole VAE).

Adapter-only checkpoints (`save_adapters`/`load_adapters`) hold every trainable parameter of a LightningModule
(LoRA weights, fusion head, null embedding) in one safetensors file: megabytes instead of the frozen bases.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

import torch
from diffusers.models.attention_processor import Attention
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from text2img.errors import ConfigError
from text2img.utils.files import atomic_path

ModuleT = TypeVar("ModuleT", bound=nn.Module)

# Layer types peft's LoRA adapts (Conv1D: GPT-2's transposed Linear).
ADAPTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, Conv1D)
# Written into adapter files, so a reader knows what it holds.
ADAPTERS_FORMAT = "text2img-adapters/1"


@dataclass
class LoraSettings:
    """rank r and scale alpha (the update is alpha/r * B A), dropout on the adapter's input, and the module
    names to adapt (peft's matching: a name, or the end of a dotted path); None: `default_targets`."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] | None = None


@dataclass(frozen=True)
class TargetFamily:
    """The default LoRA targets of one family of layers, found by a test on each submodule."""

    description: str
    present: Callable[[nn.Module], bool]
    targets: tuple[str, ...]


def _has_layers(module: nn.Module, names: tuple[str, ...], kind: type[nn.Module] = nn.Linear) -> bool:
    return all(isinstance(getattr(module, name, None), kind) for name in names)


# Attention (or modulation) projections: where LoRA is usually put. Transformers families are recognised by
# their layers' names, which each family's classes share; text2img's and diffusers' by their classes.
# Other modules name their own in a `lora_targets` attribute (the GAN's FiLM layers, the VAE's text projections;
# the GAN's token cross-attention is an nn.MultiheadAttention with other key/value widths, which peft cannot
# adapt, and LoRA on its out_proj would be bypassed by the fused attention kernel).
TARGET_FAMILIES = (
    TargetFamily(
        "Llama/Mistral/Qwen-style attention",
        lambda m: _has_layers(m, ("q_proj", "k_proj", "v_proj", "o_proj")),
        ("q_proj", "k_proj", "v_proj", "o_proj"),
    ),
    TargetFamily(
        "BERT-style attention",
        lambda m: _has_layers(m, ("query", "key", "value")),
        ("query", "key", "value", "attention.output.dense"),
    ),
    TargetFamily("GPT-2 attention", lambda m: _has_layers(m, ("c_attn", "c_proj"), Conv1D), ("c_attn", "attn.c_proj")),
    TargetFamily("diffusers attention", lambda m: isinstance(m, Attention), ("to_q", "to_k", "to_v", "to_out.0")),
)


def adaptable_layers(module: nn.Module) -> dict[str, nn.Module]:
    """The layers of `module` LoRA can adapt, by name; not those inside an nn.MultiheadAttention, whose forward
    reads their weights directly (an adapter there would be silently skipped)."""
    inside_attention = {
        f"{name}.{child}" if name else child
        for name, layer in module.named_modules()
        if isinstance(layer, nn.MultiheadAttention)
        for child, _ in layer.named_children()
    }
    return {
        name: layer
        for name, layer in module.named_modules()
        if isinstance(layer, ADAPTABLE) and name not in inside_attention
    }


def _candidates(module: nn.Module, count: int = 12) -> str:
    """A few distinct target names for messages: each adaptable layer's last name (two where it is an index)."""
    shorts: dict[str, None] = {}
    for name in adaptable_layers(module):
        parts = name.split(".")
        shorts.setdefault(".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1])
    return ", ".join(list(shorts)[:count]) or "none"


def _matches(name: str, target: str) -> bool:
    """peft's rule for a target name: the module's full name, or the end of it after a dot."""
    return name == target or name.endswith(f".{target}")


def default_targets(module: nn.Module, option: str) -> list[str]:
    """The targets of every family in `TARGET_FAMILIES` present in `module` (in that order), then those its
    submodules declare in `lora_targets`."""
    targets: list[str] = []
    submodules = list(module.modules())
    for family in TARGET_FAMILIES:
        if any(family.present(submodule) for submodule in submodules):
            targets += [target for target in family.targets if target not in targets]
    for submodule in submodules:
        targets += [target for target in getattr(submodule, "lora_targets", ()) if target not in targets]
    if not targets:
        raise ConfigError(
            f"no default LoRA targets for {type(module).__name__}; set {option}.targets=[...] "
            f"(module names such as {_candidates(module)})"
        )
    return targets


def _check_targets(module: nn.Module, targets: list[str], option: str) -> list[nn.Module]:
    """The layers `targets` select; one line naming `option` for a target that selects nothing, or a layer
    LoRA cannot adapt."""
    adaptable = adaptable_layers(module)
    selected: list[nn.Module] = []
    for target in targets:
        matched = [(name, layer) for name, layer in module.named_modules() if name and _matches(name, target)]
        if not matched:
            raise ConfigError(
                f"{option}.targets={targets} matches no module of {type(module).__name__} ('{target}' matches "
                f"nothing); candidates: {_candidates(module)}"
            )
        for name, layer in matched:
            if name not in adaptable:
                raise ConfigError(
                    f"{option}.targets={targets}: '{target}' selects {name}, a {type(layer).__name__}, which LoRA "
                    f"cannot adapt; name Linear, Conv or Embedding layers such as {_candidates(module)}"
                )
            selected.append(layer)
    return selected


def add_lora(module: nn.Module, settings: LoraSettings, option: str) -> int:
    """Inject LoRA adapters into `module` (in place), freeze every other parameter of it, and return the
    number of trainable parameters. `option` is the config path of `settings`, for messages."""
    if has_lora(module):
        raise ConfigError(f"{option}: {type(module).__name__} already has LoRA adapters; add them once")
    if settings.rank < 1:
        raise ConfigError(f"{option}.rank={settings.rank} must be >= 1 (e.g. 8)")
    targets = list(settings.targets) if settings.targets is not None else default_targets(module, option)
    selected = _check_targets(module, targets, option)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        # GPT-2's Conv1D stores its weight transposed; peft needs to be told.
        fan_in_fan_out=any(isinstance(layer, Conv1D) for layer in selected),
    )
    inject_adapter_in_model(config, module)
    for name, parameter in module.named_parameters():
        parameter.requires_grad_(is_lora_parameter(name))
    return sum(parameter.numel() for parameter in module.parameters() if parameter.requires_grad)


def is_lora_parameter(name: str) -> bool:
    """Whether a parameter name is an adapter's (peft names them lora_A, lora_B, lora_embedding_A...)."""
    return ".lora_" in f".{name}"


def has_lora(module: nn.Module) -> bool:
    return any(isinstance(submodule, BaseTunerLayer) for submodule in module.modules())


def lora_settings(module: nn.Module) -> LoraSettings:
    """The settings `add_lora` was given for `module` (peft keeps its config on the module)."""
    config = module.peft_config["default"]
    return LoraSettings(
        rank=config.r, alpha=config.lora_alpha, dropout=config.lora_dropout, targets=sorted(config.target_modules)
    )


def key_mismatch(expected: Iterable[str], given: Iterable[str]) -> str:
    """'N missing (e.g. [...]), M unexpected (e.g. [...])' for two sets of weight names, or '' when they agree."""
    expected, given = set(expected), set(given)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if not missing and not unexpected:
        return ""
    return f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"


def lora_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The adapter weights of a module given to `add_lora` (peft's names, without the adapter's name)."""
    return get_peft_model_state_dict(module)


def load_lora_state_dict(module: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load `lora_state_dict`'s output into a module with the same adapters; every key must match."""
    mismatch = key_mismatch(lora_state_dict(module).keys(), state.keys())
    if mismatch:
        raise ValueError(
            f"the LoRA weights do not fit {type(module).__name__}'s adapters: {mismatch}; add LoRA with the "
            "settings they were trained with"
        )
    result = set_peft_model_state_dict(module, dict(state))
    assert not result.unexpected_keys, result.unexpected_keys


def merge_lora(module: nn.Module) -> None:
    """Fold every adapter into its base weight and put the plain base layer back in its place (in place), so
    `module` is again a plain transformers/diffusers module: save_pretrained writes no LoRA keys."""
    for name, layer in list(module.named_modules()):
        if isinstance(layer, BaseTunerLayer):
            layer.merge()
            parent_name, _, child_name = name.rpartition(".")
            setattr(module.get_submodule(parent_name), child_name, layer.get_base_layer())
    if hasattr(module, "peft_config"):
        del module.peft_config


def merged_copy(module: ModuleT) -> ModuleT:
    """`module` itself without adapters; with them, a merged deep copy (the original keeps training)."""
    if not has_lora(module):
        return module
    merged = copy.deepcopy(module)
    merge_lora(merged)
    return merged


def lora_roots(model: nn.Module) -> dict[str, nn.Module]:
    """The submodules of `model` that `add_lora` adapted, by name."""
    return {name: submodule for name, submodule in model.named_modules() if hasattr(submodule, "peft_config")}


def trainable_names(model: nn.Module) -> list[str]:
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]


def save_adapters(model: nn.Module, path: Path, state: Mapping[str, Tensor] | None = None) -> Path:
    """Write every trainable parameter of `model` to the safetensors file `path` (atomically).

    `state` supplies the values by parameter name (e.g. a checkpoint's `state_dict`, which holds the EMA
    weights); default: the model's own. The metadata names the LoRA-adapted submodules and their settings.
    """
    values = dict(model.named_parameters()) if state is None else state
    tensors = {name: values[name].detach().cpu().contiguous() for name in trainable_names(model)}
    lora = {name: asdict(lora_settings(root)) for name, root in lora_roots(model).items()}
    metadata = {"format": ADAPTERS_FORMAT, "lora": json.dumps(lora)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return path


def load_adapters(model: nn.Module, path: Path) -> None:
    """Load a `save_adapters` file into `model`, which must have the same trainable parameters (the same
    LoRA settings, fusion head and generator): every key and shape is checked."""
    parameters = {name: parameter for name, parameter in model.named_parameters() if parameter.requires_grad}
    with safe_open(str(path), framework="pt") as file:
        if (file.metadata() or {}).get("format") != ADAPTERS_FORMAT:
            raise ConfigError(f"{path} is not a text2img adapter file; pass one written by save_adapters")
        tensors = {name: file.get_tensor(name) for name in file.keys()}
    upgrade = getattr(model, "upgrade_state_dict", None)  # a file written under older parameter names
    if upgrade is not None:
        tensors = upgrade(tensors)
    mismatch = key_mismatch(parameters.keys(), tensors.keys())
    if mismatch:
        raise ConfigError(
            f"{path} does not fit the model's trainable parameters: {mismatch}; build the model with the run's "
            "LoRA settings"
        )
    wrong = [name for name, tensor in tensors.items() if tensor.shape != parameters[name].shape]
    if wrong:
        raise ConfigError(
            f"{path}: {wrong[0]} has shape {tuple(tensors[wrong[0]].shape)}, the model's "
            f"{tuple(parameters[wrong[0]].shape)}; build the model with the run's LoRA settings (rank)"
        )
    with torch.no_grad():
        for name, tensor in tensors.items():
            parameters[name].copy_(tensor)
