"""Any transformers model (hub name or local folder) as a text encoder."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
from transformers.utils import cached_file

from text2img.encoders.base import TextEncoder
from text2img.types import TextEmbedding

log = logging.getLogger(__name__)

POOLINGS = ("last", "mean")
DTYPES = ("float32", "bfloat16", "float16")


def load_gguf(
    name_or_path: str, gguf_file: str, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Dequantise a GGUF checkpoint into a plain base model (no LM head) and its tokenizer.

    Not `from_pretrained(gguf_file=...)`: in transformers 5 that requires `accelerate`, which this project
    does not depend on. Building the model from the GGUF's config and loading its dequantised tensors gives
    bit-identical weights.
    """
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, gguf_file=gguf_file)
    model = AutoModel.from_config(AutoConfig.from_pretrained(name_or_path, gguf_file=gguf_file), dtype=dtype)
    path = cached_file(name_or_path, gguf_file)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    # Extra tensors (an untied LM head) are not needed by the base model; missing ones would be random.
    missing, _ = model.load_state_dict(tensors, strict=False)
    if missing:
        raise ValueError(
            f"{gguf_file} has no weights for {len(missing)} parameters of {type(model).__name__} "
            f"(e.g. {missing[0]}); convert the model to safetensors and set encoder.model to that folder"
        )
    return tokenizer, model.eval()


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
    """Hidden states of one layer of a transformers model, one row per caption.

    Captions are wrapped by `template`, tokenized with right padding and truncated to `max_length`. With
    right padding and an attention mask, a caption's real positions do not depend on the other captions
    in its batch, so captions are sorted by length and each batch is padded only to its own longest.
    """

    def __init__(
        self,
        model: str,
        hidden_size: int,
        layer: int = -1,
        max_length: int = 32,
        pooling: str = "last",
        template: str = "{caption}",
        trust_remote_code: bool = False,
        dtype: str = "float32",
        batch_size: int = 64,
        gguf_file: str | None = None,
        trainable: bool = False,
    ) -> None:
        super().__init__()
        if "{caption}" not in template:
            raise ValueError(f"encoder.template={template!r} lacks '{{caption}}'; add it where the caption goes")
        if pooling not in POOLINGS:
            raise ValueError(f"encoder.pooling={pooling!r} is unknown; use one of {', '.join(POOLINGS)}")
        if dtype not in DTYPES:
            raise ValueError(f"encoder.dtype={dtype!r} is unknown; use one of {', '.join(DTYPES)}")
        if max_length < 1 or batch_size < 1:
            raise ValueError(f"encoder.max_length={max_length} and encoder.batch_size={batch_size} must be >= 1")
        self.model_name = str(model)
        self.hidden_size = hidden_size
        self.layer = layer
        self.max_length = max_length
        self.pooling = pooling
        self.template = template
        self.trust_remote_code = trust_remote_code
        self.dtype = dtype
        self.batch_size = batch_size
        self.gguf_file = gguf_file
        self.trainable = trainable
        self.model: PreTrainedModel | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self._hidden_index = 0
        # Follows `.to(device)` before the weights exist, so a lazy load lands on the right device.
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)
        self.train()  # a frozen encoder starts (and stays) in eval mode

    @property
    def model_id(self) -> str:
        """The weights' name without machine-specific paths, so cache keys survive moving a folder."""
        name = Path(self.model_name).name if os.path.isdir(self.model_name) else self.model_name
        return f"{name}/{Path(self.gguf_file).name}" if self.gguf_file else name

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
            "pooling": self.pooling,
            "template": self.template,
            "max_length": self.max_length,
            "dtype": self.dtype,
        }

    def _load_pretrained(self) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
        """Tokenizer and base model; subclasses that ship their weights differently override this."""
        if self.gguf_file:
            return load_gguf(self.model_name, self.gguf_file, self.torch_dtype)
        remote = {"trust_remote_code": self.trust_remote_code}
        tokenizer = AutoTokenizer.from_pretrained(self.model_name, **remote)
        return tokenizer, AutoModel.from_pretrained(self.model_name, dtype=self.torch_dtype, **remote)

    def load(self) -> None:
        """Load the weights now (`encode` does it on first use); a trainable encoder needs this before
        its parameters are handed to an optimizer."""
        if self.model is not None:
            return
        start = time.perf_counter()
        tokenizer, model = self._load_pretrained()
        self._hidden_index = self._check(model)
        tokenizer.padding_side = "right"
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError(f"{self.model_id}'s tokenizer has neither a pad nor an eos token; pick another model")
            tokenizer.pad_token = tokenizer.eos_token
        model.config.use_cache = False
        _drop_unused_layers(model, self._hidden_index + 1)
        model.requires_grad_(self.trainable)
        model.train(self.training)
        self.tokenizer = tokenizer
        self.model = model.to(self._device_anchor.device)
        log.info("Loaded text encoder %s in %.1f s", self.model_id, time.perf_counter() - start)

    def _check(self, model: PreTrainedModel) -> int:
        """Validate the config against the loaded model; return the hidden-state index to read."""
        config = model.config
        actual = getattr(config, "hidden_size", None)
        if actual is not None and actual != self.hidden_size:
            raise ValueError(
                f"encoder.hidden_size={self.hidden_size} but {self.model_id} has hidden size {actual}; "
                f"set encoder.hidden_size={actual}"
            )
        layers = config.num_hidden_layers
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
        return self.layer % (layers + 1)

    def unload(self) -> None:
        self.model = None
        self.tokenizer = None

    def train(self, mode: bool = True) -> HFTextEncoder:
        # A frozen encoder stays in eval mode (no dropout) even inside a module being trained.
        return super().train(mode and self.trainable)

    def _features(self, captions: Sequence[str]) -> list[dict[str, list[int]]]:
        """Tokenize without padding; counts (and warns about) captions cut by max_length."""
        assert self.tokenizer is not None
        texts = [self.template.replace("{caption}", caption) for caption in captions]
        cut = sum(len(ids) > self.max_length for ids in self.tokenizer(texts)["input_ids"])
        if cut:
            log.warning(
                "%d of %d captions are longer than encoder.max_length=%d tokens and were truncated",
                cut, len(texts), self.max_length,
            )
        encoded = self.tokenizer(texts, truncation=True, max_length=self.max_length)
        features = [{key: encoded[key][i] for key in encoded} for i in range(len(texts))]
        fallback = self.tokenizer.bos_token_id
        fallback = self.tokenizer.eos_token_id if fallback is None else fallback
        for row in features:
            if not row["input_ids"]:
                # An empty prompt would be an all-padding row (NaN attention downstream): give it one token.
                row.update({key: [0] for key in row}, input_ids=[fallback], attention_mask=[1])
        return features

    def _pool(self, hidden: Tensor, mask: Tensor) -> Tensor:
        if self.pooling == "last":
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), mask.sum(1) - 1]
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)

    def encode(self, captions: Sequence[str]) -> TextEmbedding:
        device = self._device_anchor.device
        if not captions:
            tokens = torch.zeros(0, self.max_length, self.hidden_size, device=device)
            return TextEmbedding(tokens, torch.zeros(0, self.max_length, dtype=torch.bool, device=device), tokens[:, 0])
        self.load()
        assert self.model is not None and self.tokenizer is not None
        features = self._features(captions)
        order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
        tokens, masks, pooled = [], [], []
        with nullcontext() if self.trainable else torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                rows = [features[i] for i in order[start : start + self.batch_size]]
                batch = self.tokenizer.pad(rows, padding=True, return_tensors="pt").to(device)
                out = self.model(**batch, output_hidden_states=True)
                hidden = out.hidden_states[self._hidden_index].float()
                mask = batch["attention_mask"].bool()
                # `where`, not a product: padded positions of some attention kernels are NaN.
                hidden = torch.where(mask[..., None], hidden, 0.0)
                pad = self.max_length - mask.shape[1]
                tokens.append(F.pad(hidden, (0, 0, 0, pad)))
                masks.append(F.pad(mask, (0, pad)))
                pooled.append(self._pool(hidden, mask))
        # Built outside inference mode, so the result is an ordinary tensor that autograd may save.
        restore = torch.argsort(torch.tensor(order, device=device))
        return TextEmbedding(torch.cat(tokens)[restore], torch.cat(masks)[restore], torch.cat(pooled)[restore])
