"""Any transformers model (hub name or local folder) as a text encoder."""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from huggingface_hub import is_offline_mode
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from text2img.encoders.base import TextEncoder
from text2img.errors import ConfigError
from text2img.utils.lora import LoraSettings, add_lora
from text2img.utils.precision import WEIGHT_DTYPES
from text2img.utils.text_features import text_features
# Standalone: exports ship a copy of it beside their loader, so exported models encode identically.
from text2img.encoders.text_model import (
    COMBINES, KEEP_TOKENS, TokenizedTexts, encode_tokens, hidden_indices, load_text_model, prepare_text_model, tokenize,
)
from text2img.types import TextEmbedding

log = logging.getLogger(__name__)

POOLINGS = ("last", "mean")
MODES = ("frozen", "lora", "full")
# Bidirectional encoders: every position sees the next token, so they have no next-token loss.
BIDIRECTIONAL = ("bert", "roberta", "xlm-roberta", "distilbert", "deberta", "deberta-v2", "electra", "mpnet", "albert")


@functools.lru_cache(maxsize=16)
def pretrained_config(
    model: str, trust_remote_code: bool = False, gguf_file: str | None = None, key: str = "encoder"
) -> PretrainedConfig:
    """The text model's config of a hub name or local folder, without its weights: sizes are read from it before
    anything loads. `key` is the config node that names the model, for messages (`<key>.model`)."""
    fix = "give a folder written by save_pretrained (config.json, weights, tokenizer) or a hub model name"
    if os.path.isdir(model) and not gguf_file and not os.path.isfile(os.path.join(model, "config.json")):
        raise ConfigError(f"{key}.model='{model}' is a folder without a model's config.json; {fix}")
    try:
        config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code, gguf_file=gguf_file)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ConfigError(
                f"{key}.model='{model}' runs code of its own to load; set {key}.trust_remote_code=true if you trust it"
            ) from exc
        raise ConfigError(f"{key}.model='{model}' holds no usable config ({str(exc).splitlines()[0]}); {fix}") from exc
    except OSError as exc:
        if os.path.isdir(model):  # a GGUF file that is not there
            raise ConfigError(f"{key}.model='{model}' cannot be read ({str(exc).splitlines()[0]}); {fix}") from exc
        if is_offline_mode():
            raise ConfigError(
                f"{key}.model='{model}': no such folder, and not reachable on the hub in offline mode (HF_HUB_OFFLINE=1); "
                f"{fix} that is already in the hub cache (unset HF_HUB_OFFLINE to download it)"
            ) from exc
        raise ConfigError(f"{key}.model='{model}': no such folder, and not found on the hub; {fix}") from exc
    return config.get_text_config()


def _drop_unused_layers(model: PreTrainedModel, keep: int) -> None:
    """Keep only the first `keep` blocks when the requested hidden state comes from an earlier one.

    The caller keeps one block more than the layer it reads, so the final norm that transformers applies
    to the last returned hidden state never touches the one read. Models whose block list cannot be found
    unambiguously are left whole.
    """
    total = model.config.num_hidden_layers
    stacks = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == total]
    if keep >= total or len(stacks) != 1:
        return
    del stacks[0][keep:]
    # Llama-style models loop over `layers[:config.num_hidden_layers]`; keep the two in agreement.
    model.config.num_hidden_layers = keep


class HFTextEncoder(TextEncoder):
    """Hidden states of a transformers model, one row per caption: of one layer (`layer`, or the mean of
    `layer_mean` consecutive layers ending there) or of several (`layers`: a list of indices or `all`, every
    block's output), each normalised (`layer_norm`) and then averaged or concatenated on the feature axis
    (`combine`): the field's layer choices (the last, the penultimate as in Lumina-Image 2.0 and Kolors, a
    normalised average of all as in NVIDIA's CVPR 2025 encoder study, three concatenated as in FLUX.2).

    Captions are wrapped by `template` and, with `chat_template`, by the tokenizer's chat template as the user
    turn (after a `system_prompt` turn if set; without one, the template's own default applies, e.g.
    SmolLM2's built-in system prompt). They are tokenized with right padding and truncated to `max_length`,
    which counts the chat template's tokens too; the mask marks every real token, template included, unless
    `keep_tokens` drops the template's tokens after encoding (`caption`, as Qwen-Image drops its prompt's prefix,
    or `first_and_caption`, as Sana keeps the first token too): the LLM reads the template, the generator does not.
    With
    right padding and an attention mask, a caption's real positions do not depend on the other captions
    in its batch, so captions are sorted by length and each batch is padded only to its own longest.

    `mode` says how the encoder trains with the generator: `frozen` (no gradients; its embeddings are cached
    once), `lora` (peft low-rank adapters on the attention projections, settings in `lora`; the base weights
    stay frozen) or `full` (every weight). `gradient_checkpointing` trades a second forward pass of the LLM for
    not storing its activations, when it trains.
    """

    def __init__(
        self,
        model: str,
        hidden_size: int,
        layer: int = -1,
        layer_mean: int = 1,
        layers: int | Sequence[int] | str | None = None,
        layer_norm: bool | None = None,
        combine: str = "mean",
        keep_tokens: str = "all",
        features: int | None = None,
        num_layers: int | None = None,
        max_length: int = 32,
        pooling: str = "last",
        template: str = "{caption}",
        chat_template: bool = False,
        system_prompt: str | None = None,
        trust_remote_code: bool = False,
        dtype: str = "float32",
        batch_size: int = 64,
        gguf_file: str | None = None,
        mode: str = "frozen",
        lora: LoraSettings | None = None,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if "{caption}" not in template:
            raise ValueError(f"encoder.template={template!r} lacks '{{caption}}'; add it where the caption goes")
        if pooling not in POOLINGS:
            raise ValueError(f"encoder.pooling={pooling!r} is unknown; use one of {', '.join(POOLINGS)}")
        if dtype not in WEIGHT_DTYPES:
            raise ValueError(f"encoder.dtype={dtype!r} is unknown; use one of {', '.join(WEIGHT_DTYPES)}")
        if layer_mean < 1:
            raise ValueError(f"encoder.layer_mean={layer_mean} must be >= 1 (1 = the layer alone)")
        if isinstance(layers, str) and layers != "all":
            raise ConfigError(f"encoder.layers={layers!r} is not an index, a list of indices or all")
        if layers is not None and not isinstance(layers, (int, str)):
            layers = list(layers)  # a Hydra ListConfig
        if layers is not None and (layer != -1 or layer_mean != 1):
            raise ConfigError(
                f"encoder.layers={layers} and encoder.layer={layer}/layer_mean={layer_mean} both choose layers; "
                "give encoder.layers alone (e.g. [-1, -2]) or set encoder.layers=null"
            )
        if combine not in COMBINES:
            raise ConfigError(f"encoder.combine={combine!r} is unknown; use one of {', '.join(COMBINES)}")
        if combine == "concat" and not isinstance(layers, list) and layers != "all":
            raise ConfigError(
                f"encoder.combine=concat joins several layers on the feature axis, but encoder.layers={layers}; "
                "give a list (e.g. encoder.layers=[10,20,30]) or all"
            )
        if combine == "concat" and layers == "all" and num_layers is None:
            raise ConfigError(
                "encoder.layers=all with encoder.combine=concat needs encoder.num_layers, the model's layer count, to "
                "size the features; set it"
            )
        if keep_tokens not in KEEP_TOKENS:
            raise ConfigError(f"encoder.keep_tokens={keep_tokens!r} is unknown; use one of {', '.join(KEEP_TOKENS)}")
        width = text_features(hidden_size, layers, combine, num_layers)
        if features is not None and features != width:
            raise ConfigError(
                f"encoder.features={features}, but encoder.layers={layers} with combine={combine} gives {width} "
                "features; leave encoder.features to its default"
            )
        if system_prompt is not None and not chat_template:
            raise ValueError(
                f"encoder.system_prompt={system_prompt!r} needs encoder.chat_template=true; set it or drop the prompt"
            )
        if mode not in MODES:
            raise ConfigError(f"encoder.mode={mode!r} is unknown; use one of {', '.join(MODES)}")
        if mode == "full" and dtype != "float32":
            raise ConfigError(
                f"encoder.mode=full trains every weight, which needs float32 master weights, not "
                f"encoder.dtype={dtype}; set encoder.dtype=float32 (trainer.precision=bf16-mixed still computes in bfloat16)"
            )
        if lora is not None and mode != "lora":
            raise ConfigError(f"LoRA settings are given but encoder.mode={mode}; use peft=lora (encoder.mode=lora)")
        if max_length < 1 or batch_size < 1:
            raise ValueError(f"encoder.max_length={max_length} and encoder.batch_size={batch_size} must be >= 1")
        self.model_name = str(model)
        self.hidden_size = hidden_size
        self.layer = layer
        self.layer_mean = layer_mean
        self.layers = layers
        # Several layers read through `layers` are normalised unless told otherwise: their scales differ by orders
        # of magnitude (SmolLM2's median token RMS: 0.1 at the embeddings, 2 to 27 in the blocks, with a
        # first token near 1,000 from block 12 on), so a plain mean would be the loudest layers'.
        self.layer_norm = isinstance(layers, str) or (isinstance(layers, list) and len(layers) > 1)
        if layer_norm is not None:
            self.layer_norm = bool(layer_norm)
        self.combine = combine
        self.keep_tokens = keep_tokens
        self.features = width
        self.num_layers = num_layers
        self.max_length = max_length
        self.pooling = pooling
        self.template = template
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        self.trust_remote_code = trust_remote_code
        self.dtype = dtype
        self.batch_size = batch_size
        self.gguf_file = gguf_file
        self.mode = mode
        self.lora = lora
        self.gradient_checkpointing = gradient_checkpointing
        self.model: PreTrainedModel | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        # Indices into the model's `hidden_states` of the layers read (resolved when the model loads).
        self.hidden_indices: list[int] = []
        # Whether the layers after the one read were kept (`load(whole=True)`).
        self.whole_model = False
        # Truncation is reported once per encoder, not on every batch of a trainable one.
        self._truncation_reported = False
        # Follows `.to(device)` before the weights exist, so a lazy load lands on the right device.
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)
        self.train()  # a frozen encoder starts (and stays) in eval mode

    @property
    def model_id(self) -> str:
        """The weights' name without machine-specific paths, so cache keys survive moving a folder."""
        name = Path(self.model_name).name if os.path.isdir(self.model_name) else self.model_name
        return f"{name}/{Path(self.gguf_file).name}" if self.gguf_file else name

    @property
    def trainable(self) -> bool:
        return self.mode != "frozen"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def is_loaded(self) -> bool:
        return self.model is not None

    def identity(self) -> dict[str, Any]:
        return {
            "class": type(self).__name__,
            "model": self.model_id,
            "layer": self.layer,
            "layer_mean": self.layer_mean,
            "layers": self.layers,
            "layer_norm": self.layer_norm,
            "combine": self.combine,
            "keep_tokens": self.keep_tokens,
            "pooling": self.pooling,
            "template": self.template,
            "chat_template": self.chat_template,
            "system_prompt": self.system_prompt,
            "max_length": self.max_length,
            "dtype": self.dtype,
        }

    def reference(self) -> dict[str, Any] | None:
        """How to load these weights without text2img (`text2img.encoders.text_model.load_text_model`'s
        arguments), or None where they exist only in code; an export writes it next to (or instead of) a copy of
        them."""
        return {"model": self.model_name, "gguf_file": self.gguf_file, "trust_remote_code": self.trust_remote_code}

    def _load_pretrained(self) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
        """Tokenizer and base model; subclasses that ship their weights differently override this."""
        return load_text_model(self.model_name, self.torch_dtype, self.gguf_file, self.trust_remote_code)

    def text_config(self) -> PretrainedConfig | None:
        """The model's config without its weights, or None when it cannot be read before they load."""
        return pretrained_config(self.model_name, self.trust_remote_code, self.gguf_file)

    def layer_indices(self) -> list[int]:
        """The `hidden_states` indices of the layers read (negative indices and `all` resolved): from the model's
        config where it can be read without the weights, else from the loaded model."""
        if self.model is None and (config := self.text_config()) is not None:
            return self._check(config)
        self.load()
        return self.hidden_indices

    def check_config(self) -> None:
        """Check the settings against the model's config before any weights load (`load` checks them anyway)."""
        if (config := self.text_config()) is not None:
            self._check(config)

    def load(self, whole: bool = False) -> None:
        """Load the weights now (`encode` does it on first use); a trainable encoder needs this before
        its parameters are handed to an optimizer. `whole` keeps the layers after the one read, which
        `next_token_loss` needs."""
        if self.model is not None:
            if whole and not self.whole_model:
                raise RuntimeError("the encoder was loaded without its last layers; load(whole=True) before encoding")
            return
        start = time.perf_counter()
        tokenizer, model = self._load_pretrained()
        self.hidden_indices = self._check(model.config)
        layers = model.config.num_hidden_layers
        if self.chat_template and tokenizer.chat_template is None:
            raise ValueError(
                f"encoder.chat_template=true but {self.model_id}'s tokenizer has no chat template; "
                "set encoder.chat_template=false"
            )
        prepare_text_model(tokenizer, model, self.model_id)
        if not whole:
            # Every state read comes from these blocks.
            _drop_unused_layers(model, max(self.hidden_indices) + 1)
        self.whole_model = model.config.num_hidden_layers == layers
        # In `dtype` whatever the loader did (a model built in code starts in float32).
        model.to(self.torch_dtype).requires_grad_(self.mode == "full")
        if self.mode == "lora":
            trainable = add_lora(model, self.lora or LoraSettings(), "peft")
            # peft makes the adapters in the base's dtype; they train, so they keep float32 (master) weights
            # on a base that may be bfloat16 (mixed precision computes in bfloat16 all the same).
            for parameter in model.parameters():
                if parameter.requires_grad:
                    parameter.data = parameter.data.float()
            log.info("LoRA on %s: %d trainable parameters", self.model_id, trainable)
        if self.gradient_checkpointing and self.trainable:
            if not model.supports_gradient_checkpointing:
                raise ConfigError(
                    f"{self.model_id} does not support gradient checkpointing; set encoder.gradient_checkpointing=false"
                )
            # Non-reentrant: works when the inputs (token ids) need no gradient, as with LoRA on a frozen base.
            # (transformers 5.x renamed it; the old name warns of its removal in 6.)
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.train(self.training)
        self.tokenizer = tokenizer
        self.model = model.to(self._device_anchor.device)
        log.info("Loaded text encoder %s in %.1f s", self.model_id, time.perf_counter() - start)

    def _check(self, config: PretrainedConfig) -> list[int]:
        """Validate the settings against the model's config; return the hidden-state indices to read."""
        actual = getattr(config, "hidden_size", None)
        if actual is not None and actual != self.hidden_size:
            raise ValueError(
                f"encoder.hidden_size={self.hidden_size} but {self.model_id} has hidden size {actual}; "
                f"set encoder.hidden_size={actual}"
            )
        layers = config.num_hidden_layers
        if self.num_layers is not None and self.num_layers != layers:
            raise ValueError(
                f"encoder.num_layers={self.num_layers} but {self.model_id} has {layers} layers; set encoder.num_layers={layers}"
            )
        if not -(layers + 1) <= self.layer <= layers:
            raise ValueError(
                f"encoder.layer={self.layer} is out of range for {self.model_id}, which has {layers} layers; "
                f"set encoder.layer between {-(layers + 1)} and {layers} (0 = embeddings, -1 = last)"
            )
        positions = getattr(config, "max_position_embeddings", None)
        if positions is not None and self.max_length > positions:
            raise ValueError(
                f"encoder.max_length={self.max_length} exceeds {self.model_id}'s {positions} positions; "
                f"set encoder.max_length<={positions}"
            )
        index = self.layer % (layers + 1)
        if self.layer_mean > index + 1:
            raise ValueError(
                f"encoder.layer_mean={self.layer_mean} with encoder.layer={self.layer} reaches below the embeddings "
                f"of {self.model_id}, which has {layers} layers; set encoder.layer_mean<={index + 1}"
            )
        try:
            return hidden_indices(self.layers, self.layer, self.layer_mean, layers)
        except ValueError as exc:
            raise ValueError(f"{exc} ({self.model_id})") from None

    def unload(self) -> None:
        if self.trainable:
            return  # its weights are being trained: they live with the model, not in a cache
        self.model = None
        self.tokenizer = None

    def train(self, mode: bool = True) -> HFTextEncoder:
        # A frozen encoder stays in eval mode (no dropout) even inside a module being trained.
        return super().train(mode and self.trainable)

    def encode(self, captions: Sequence[str]) -> TextEmbedding:
        device = self._device_anchor.device
        if not captions:
            tokens = torch.zeros(0, self.max_length, self.features, device=device)
            return TextEmbedding(tokens, torch.zeros(0, self.max_length, dtype=torch.bool, device=device), tokens[:, 0])
        self.load()
        assert self.model is not None and self.tokenizer is not None
        tokens, mask, pooled = encode_tokens(
            self.model, self.tokenizer, self._tokenize(captions), max_length=self.max_length,
            hidden_indices=self.hidden_indices, layer_norm=self.layer_norm, combine=self.combine,
            pooling=self.pooling, batch_size=self.batch_size, device=device, grad=self.trainable,
        )
        return TextEmbedding(tokens, mask, pooled)

    def _tokenize(self, captions: Sequence[str], keep_tokens: str | None = None) -> TokenizedTexts:
        """The captions' tokens; `keep_tokens` overrides the encoder's choice."""
        assert self.tokenizer is not None
        texts = tokenize(
            self.tokenizer, captions, template=self.template, max_length=self.max_length,
            chat_template=self.chat_template, system_prompt=self.system_prompt,
            keep_tokens=self.keep_tokens if keep_tokens is None else keep_tokens,
        )
        if texts.truncated and not self._truncation_reported:
            self._truncation_reported = True
            log.warning(
                "encoder: %d of %d captions truncated to max_length=%d tokens; raise encoder.max_length to keep "
                "them whole", texts.truncated, len(captions), self.max_length,
            )
        return texts

    def token_ids(self, text: str) -> list[int]:
        """The ids of the tokens whose states `encode([text])` returns, in order (the template's dropped ones left
        out)."""
        self.load()
        return self._tokenize([text]).kept_ids(0)

    def check_next_token_loss(self) -> None:
        """Fail with one line when this model has no next-token loss to keep it from drifting."""
        self.load(whole=True)
        assert self.model is not None
        config = self.model.config
        if config.model_type in BIDIRECTIONAL:
            raise ConfigError(
                f"model.text_loss_weight>0 needs a causal language model, but {self.model_id} ({config.model_type}) "
                "is bidirectional and has no next-token loss; set model.text_loss_weight=0 or use encoder=smollm2"
            )
        if not getattr(config, "tie_word_embeddings", False):
            raise ConfigError(
                f"model.text_loss_weight>0 reads the LM head from the input embeddings, but {self.model_id} does not "
                "tie them; set model.text_loss_weight=0"
            )

    def next_token_loss(self, captions: Sequence[str]) -> Tensor:
        """The LLM's own mean next-token cross-entropy over the templated captions' real tokens.

        A joint objective adds it so a tuned encoder keeps modelling language; the LM head is the tied
        input embedding matrix (`check_next_token_loss` checks the model has one).
        """
        self.load(whole=True)
        assert self.model is not None and self.tokenizer is not None
        device = self._device_anchor.device
        # The whole templated text: the LLM models its template's tokens too.
        features = self._tokenize(captions, keep_tokens="all").features
        batch = self.tokenizer.pad(features, padding=True, return_tensors="pt").to(device)
        hidden = self.model(**batch).last_hidden_state
        logits = F.linear(hidden, self.model.get_input_embeddings().weight)
        labels = batch["input_ids"].masked_fill(~batch["attention_mask"].bool(), -100)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
