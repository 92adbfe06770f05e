"""Checks of every value a user can type into `text2img.train`, on the composed config, before anything is built:
each failure is one ConfigError line naming the key as typed on the command line (`trainer.max_steps=-3`) and the fix.

`check_config` runs three passes, in this order:

1. values left unset (`???`), then interpolations that do not resolve (a resolver's own ConfigError is kept);
2. `RULES`: one row per key, (key, requirement), on the resolved values; keys the chosen options lack are skipped;
3. `CROSS_CHECKS`: what needs several keys, the file system or a model's config (fraction sums, folders,
   checkpoints, the encoder's layers).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from text2img.data.splits import check_fractions
from text2img.encoders.hf import MODES, POOLINGS, HFTextEncoder, pretrained_config
from text2img.encoders.text_model import COMBINES, KEEP_TOKENS
from text2img.errors import ConfigError
from text2img.fusion.base import LAYER_MIXES, NORMS
from text2img.generators.diffusion import OBJECTIVES
from text2img.generators.flow import TIMESTEP_SAMPLING
from text2img.utils.checkpoints import load_checkpoint
from text2img.utils.precision import WEIGHT_DTYPES


@dataclass(frozen=True)
class Requirement:
    """What a value must be: a test, and its wording in the fix ("an integer >= 1"). `a | b` accepts either."""

    test: Callable[[Any], bool]
    wording: str

    def __or__(self, other: Requirement) -> Requirement:
        return Requirement(lambda value: self.test(value) or other.test(value), f"{self.wording}, or {other.wording}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # YAML's true is no count


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def integer(minimum: int) -> Requirement:
    return Requirement(lambda value: _is_int(value) and value >= minimum, f"an integer >= {minimum}")


def one_of(*choices: str) -> Requirement:
    return Requirement(lambda value: value in choices, f"one of {', '.join(choices)}")


def exactly(expected: Any, wording: str) -> Requirement:
    return Requirement(lambda value: _is_int(value) and value == expected, wording)


ANY_INTEGER = Requirement(_is_int, "an integer")
NUMBER = Requirement(_is_number, "a number")
POSITIVE = Requirement(lambda value: _is_number(value) and value > 0, "a number > 0")
NON_NEGATIVE = Requirement(lambda value: _is_number(value) and value >= 0, "a number >= 0")
RATE = Requirement(lambda value: _is_number(value) and 0 <= value < 1, "a number in [0, 1)")  # dropouts, decays
EPOCH_FRACTION = Requirement(
    lambda value: isinstance(value, float) and 0 < value <= 1, "a fraction of an epoch in (0, 1]"
)
GUIDANCE = Requirement(lambda value: _is_number(value) and value >= 1, "a number >= 1 (1: no guidance)")
FLAG = Requirement(lambda value: isinstance(value, bool), "true or false")
NULL = Requirement(lambda value: value is None, "null")
UNLIMITED = exactly(-1, "-1 (no limit)")
DURATION = Requirement(  # Lightning's max_time string
    lambda value: isinstance(value, str) and re.fullmatch(r"\d+:\d\d:\d\d:\d\d", value) is not None,
    "a duration DD:HH:MM:SS (e.g. 00:08:30:00)",
)
DEVICE_IDS = Requirement(  # Lightning's devices: "0,1" or [0, 1]
    lambda value: (isinstance(value, str) and re.fullmatch(r"\d+(,\d+)*,?", value) is not None)
    or (isinstance(value, list) and bool(value) and all(_is_int(i) and i >= 0 for i in value)),
    "device ids such as '0,1' or [0,1]",
)
TEMPLATE = Requirement(lambda value: isinstance(value, str) and "{caption}" in value, "a text holding {caption}")

SIZE = integer(1)  # dimensions, widths, counts of things that must exist

# (key as typed on the command line, requirement). Keys of every option of conf/<group>/.
RULES: tuple[tuple[str, Requirement], ...] = (
    ("seed", integer(0)),
    ("test", FLAG),
    ("optimized_mode", one_of("min", "max")),
    # data (every data= option): batch sizes, counts, image size, split fractions
    ("data.batch_size", SIZE),
    ("data.eval_batch_size", SIZE),
    ("data.val_samples", SIZE | NULL),
    ("data.eval_samples", SIZE | NULL),
    ("data.num_workers", integer(0)),
    ("data.epoch_samples", SIZE | NULL),
    ("data.source.image_size", integer(8)),
    ("data.source.val_fraction", RATE),
    ("data.source.test_fraction", RATE),
    ("data.source.images_per_composition", SIZE),
    ("data.source.shuffle_buffer", SIZE),
    ("data.source.reference_samples", SIZE),
    ("data.source.strict", FLAG),
    # trainer: steps, intervals, processes
    ("trainer.max_steps", SIZE | UNLIMITED),
    ("trainer.max_time", DURATION | NULL),
    ("trainer.val_check_interval", SIZE | EPOCH_FRACTION),
    ("trainer.check_val_every_n_epoch", SIZE | NULL),
    ("trainer.num_sanity_val_steps", integer(0) | UNLIMITED),
    ("trainer.log_every_n_steps", SIZE),
    ("trainer.accumulate_grad_batches", SIZE),
    ("trainer.gradient_clip_val", NON_NEGATIVE | NULL),
    ("trainer.accelerator", one_of("cpu", "gpu", "cuda", "mps", "tpu", "auto")),
    ("trainer.devices", SIZE | UNLIMITED | one_of("auto") | DEVICE_IDS),
    ("trainer.num_nodes", SIZE),
    ("trainer.fast_dev_run", FLAG | SIZE),
    ("trainer.deterministic", FLAG | one_of("warn")),
    # model: rates and weights
    ("model.caption_dropout", RATE),
    ("model.text_loss_weight", NON_NEGATIVE),
    ("model.encoder_lr", POSITIVE | NULL),
    ("model.optimizer.lr", POSITIVE),
    ("model.optimizer.weight_decay", NON_NEGATIVE),
    ("model.discriminator_optimizer.lr", POSITIVE),
    ("model.discriminator_optimizer.weight_decay", NON_NEGATIVE),
    ("model.lr_scheduler.num_warmup_steps", integer(0)),
    ("model.nonfinite_loss", one_of("stop", "skip")),
    ("model.max_consecutive_skips", SIZE),
    ("model.alignment_weight", NON_NEGATIVE),
    ("model.eval_seed", integer(0)),
    ("model.generator_lora.rank", SIZE),
    ("model.generator_lora.alpha", POSITIVE),
    ("model.generator_lora.dropout", RATE),
    # generator (diffusion, ldm, gan, vae)
    ("generator.image_size", integer(8)),
    ("generator.cond_dim", SIZE),
    ("generator.patch_size", SIZE),
    ("generator.sample_steps", SIZE),
    ("generator.guidance_scale", GUIDANCE),
    ("generator.loss_weighting", one_of("none", "min_snr")),
    ("generator.snr_gamma", POSITIVE),
    ("generator.time_vector", FLAG),
    ("generator.objective", one_of(*OBJECTIVES)),
    ("generator.noise_scheduler.num_train_timesteps", SIZE),
    ("generator.flow.timesteps", one_of(*TIMESTEP_SAMPLING)),
    ("generator.flow.logit_mean", NUMBER),
    ("generator.flow.logit_std", POSITIVE),
    ("generator.flow.shift", POSITIVE),
    ("generator.flow.num_train_timesteps", SIZE),
    ("generator.latent_scale", POSITIVE | NULL),
    ("generator.cache_latents", FLAG),
    ("generator.first_stage.dtype", one_of(*WEIGHT_DTYPES)),
    ("generator.width", SIZE),
    ("generator.max_width_multiplier", SIZE),
    ("generator.noise_dim", SIZE),
    ("generator.noise_in_film", FLAG),
    ("generator.upsample", one_of("nearest", "bilinear")),
    ("generator.attention", FLAG),
    ("generator.attention_resolution", SIZE),
    ("generator.attention_heads", SIZE),
    ("generator.discriminator_width", SIZE),
    ("generator.discriminator_text_features", SIZE),
    ("generator.gp_weight", NON_NEGATIVE),
    ("generator.gp_power", POSITIVE),
    ("generator.conditional", FLAG),
    ("generator.cond_channels", SIZE),
    ("generator.prior_hidden", SIZE),
    ("generator.kl_weight", POSITIVE | NULL),
    # fusion (every fusion= option)
    ("fusion.in_dim", SIZE),
    ("fusion.out_dim", SIZE),
    ("fusion.hidden_dim", SIZE | NULL),
    ("fusion.norm", one_of(*NORMS)),
    ("fusion.timestep_conditioned", FLAG),
    ("fusion.layer_mix", one_of(*LAYER_MIXES)),
    ("fusion.pooling", one_of("mean", "last")),
    ("fusion.dropout", RATE),
    ("fusion.num_latents", SIZE),
    ("fusion.depth", SIZE),
    ("fusion.heads", SIZE),
    ("fusion.mlp_ratio", POSITIVE),
    ("fusion.time_channels", SIZE),
    ("fusion.time_dim", SIZE | NULL),
    # encoder (every encoder= option)
    ("encoder.hidden_size", SIZE),
    ("encoder.layer", ANY_INTEGER),
    ("encoder.layer_mean", SIZE),
    ("encoder.layer_norm", FLAG | NULL),
    ("encoder.combine", one_of(*COMBINES)),
    ("encoder.keep_tokens", one_of(*KEEP_TOKENS)),
    ("encoder.max_length", SIZE),
    ("encoder.batch_size", SIZE),
    ("encoder.pooling", one_of(*POOLINGS)),
    ("encoder.template", TEMPLATE),
    ("encoder.chat_template", FLAG),
    ("encoder.trust_remote_code", FLAG),
    ("encoder.dtype", one_of(*WEIGHT_DTYPES)),
    ("encoder.mode", one_of(*MODES)),
    ("encoder.gradient_checkpointing", FLAG),
    ("encoder.lora.rank", SIZE),
    ("encoder.lora.alpha", POSITIVE),
    ("encoder.lora.dropout", RATE),
    # callbacks, metrics, prompt expansion
    ("callbacks.ema.decay", RATE),
    ("callbacks.sample_grid.num_images", SIZE),
    ("callbacks.sample_grid.ncols", SIZE),
    ("metrics.image.kid_sketch_size", integer(2)),
    ("metrics.image.kid_degree", SIZE),
    ("metrics.alignment.k", integer(2)),
    ("metrics.diversity.max_samples", SIZE),
    ("metrics.diversity.pixel_size", SIZE),
    ("prompt_expansion.max_new_tokens", SIZE),
    ("prompt_expansion.batch_size", SIZE),
)


def typed(value: Any) -> str:
    """A value as it would be typed in an override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)


def _lookup(values: dict, key: str) -> tuple[bool, Any]:
    """(found, value) of a dotted key in a resolved config."""
    for part in key.split("."):
        if not isinstance(values, dict) or part not in values:
            return False, None
        values = values[part]
    return True, values


# Lightning's names for checkpoints it finds itself (ckpt_path=last: the run folder's newest)
LIGHTNING_CHECKPOINTS = ("last", "best", "hpc", "registry")


def _checkpoints(cfg: DictConfig, values: dict) -> None:
    """Checkpoint files exist, are whole and were written by text2img (read memory-mapped: cheap)."""
    for key in ("ckpt_path", "model.init_from", "generator.first_stage.source"):
        found, path = _lookup(values, key)
        if not found or path is None or (key == "ckpt_path" and path in LIGHTNING_CHECKPOINTS):
            continue
        # a first stage may also be a diffusers folder or a hub name, which load_first_stage checks
        if key != "generator.first_stage.source" or str(path).endswith(".ckpt"):
            load_checkpoint(str(path), key)


def _folders(cfg: DictConfig, values: dict) -> None:
    found, path = _lookup(values, "data.source.path")
    folder = Path(str(path)).expanduser()
    if found and not folder.is_dir():
        problem = "is a file, not a folder" if folder.exists() else "does not exist"
        raise ConfigError(
            f"data.source.path={typed(path)} {problem}; give the folder holding your images and metadata.jsonl"
        )


def _fractions(cfg: DictConfig, values: dict) -> None:
    found, source = _lookup(values, "data.source")
    if found and "val_fraction" in source and "test_fraction" in source:
        check_fractions(source["val_fraction"], source["test_fraction"])


def _fusion_heads(cfg: DictConfig, values: dict) -> None:
    fusion = values.get("fusion", {})
    if "heads" in fusion and fusion["out_dim"] % fusion["heads"]:
        raise ConfigError(
            f"fusion.heads={fusion['heads']} does not divide fusion.out_dim={fusion['out_dim']}; "
            "choose heads that divide it"
        )


def _hub_models(cfg: DictConfig, values: dict) -> None:
    """Models named by a hub name or folder besides the encoder's (whose hidden size is read the same way)."""
    for node in ("prompt_expansion", "metrics.clip_score"):
        found, model = _lookup(values, f"{node}.model")
        if found and model is not None:
            pretrained_config(str(model), key=node)


def _accelerator(cfg: DictConfig, values: dict) -> None:
    found, accelerator = _lookup(values, "trainer.accelerator")
    if found and accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={accelerator} but this machine has no GPU torch can use; use trainer=cpu"
        )


def _encoder(cfg: DictConfig, values: dict) -> None:
    """The encoder's settings (layer, layer_mean, max_length, hidden size) against its model's config; no weights
    load (the encoder loads them lazily, and its constructor checks the rest)."""
    encoder = instantiate(cfg.encoder)
    if isinstance(encoder, HFTextEncoder):
        encoder.check_config()


def validation_figures(values: dict) -> list[str]:
    """Every `val/<figure>` the configured metrics can log (`EvalMetric.FIGURES`), read from their classes: nothing
    is built."""
    figures = []
    for metric in (values.get("metrics") or {}).values():
        if metric is None:
            continue
        extractor = metric.get("extractor")
        tag = get_class(extractor["_target_"]).feature_name if isinstance(extractor, dict) else ""
        figures += [f"val/{name.format(extractor=tag)}" for name in get_class(metric["_target_"]).FIGURES]
    return figures


def _optimized_metric(cfg: DictConfig, values: dict) -> None:
    """`optimized_metric`, the best checkpoint's monitor and the sweepers' value, is a figure that validation logs
    (a training figure, `train/...`, is the module's own)."""
    found, name = _lookup(values, "optimized_metric")
    if not found or name is None or str(name).startswith("train/") or "evaluation" not in values.get("callbacks", {}):
        return
    figures = validation_figures(values)
    if name not in figures:
        chosen = ",".join(key for key, metric in values.get("metrics", {}).items() if metric is not None)
        raise ConfigError(
            f"optimized_metric={typed(name)} is not a validation figure of metrics=[{chosen}], which log "
            f"{', '.join(figures) or 'nothing'}; set optimized_metric to one of them, or add the metric that "
            "computes it to metrics="
        )


CROSS_CHECKS: tuple[Callable[[DictConfig, dict], None], ...] = (
    _fractions, _folders, _fusion_heads, _accelerator, _checkpoints, _hub_models, _encoder, _optimized_metric,
)


def _unset(node: DictConfig | ListConfig, prefix: str = "") -> Iterator[str]:
    """Keys whose value is `???`, without resolving interpolations (one to an unset key would fail first)."""
    keys = node.keys() if isinstance(node, DictConfig) else range(len(node))
    for key in keys:
        child = node._get_node(key)
        if child is None:
            continue
        if child._is_missing():
            yield f"{prefix}{key}"
        elif isinstance(child, (DictConfig, ListConfig)) and not child._is_interpolation() and not child._is_none():
            yield from _unset(child, f"{prefix}{key}.")


def resolved(cfg: DictConfig) -> dict:
    """The config with every interpolation resolved; a one-line ConfigError naming the key that cannot be."""
    if unset := list(_unset(cfg)):
        verb, pronoun = ("has", "it") if len(unset) == 1 else ("have", "them")
        raise ConfigError(
            f"{', '.join(unset)} {verb} no value; set {pronoun} on the command line, e.g. {unset[0]}=<value>"
        )
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as exc:
        problem = str(exc).splitlines()[0]
        # A resolver's ConfigError already names its key and fix (OmegaConf re-raises it with this prefix).
        own = re.fullmatch(rf"{ConfigError.__name__} raised while resolving interpolation: (.*)", problem)
        if own:
            raise ConfigError(own.group(1)) from exc
        key = getattr(exc, "full_key", None) or "the config"
        raise ConfigError(f"{key} cannot be resolved: {problem}; fix the interpolation or set {key}=<value>") from exc


def check_rules(values: dict, rules: tuple[tuple[str, Requirement], ...]) -> None:
    """A one-line ConfigError for the first of `rules` that a resolved config breaks (keys it lacks are skipped);
    the other entry points check their own options with it."""
    for key, requirement in rules:
        found, value = _lookup(values, key)
        if found and not requirement.test(value):
            raise ConfigError(f"{key}={typed(value)} is invalid; set {key} to {requirement.wording}")


def check_config(cfg: DictConfig) -> None:
    """Raise a one-line error (a ConfigError, or the ValueError of a check shared with the data or the encoder)
    for the first value of a composed train config that cannot work."""
    values = resolved(cfg)
    check_rules(values, RULES)
    for check in CROSS_CHECKS:
        check(cfg, values)


def check_device(name: str) -> torch.device:
    """The device a `device=` option names, or one line saying why it cannot be used."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device; use cpu, cuda or cuda:<index>") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but torch sees no CUDA GPU; use device=cpu")
    return device
