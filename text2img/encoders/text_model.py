"""Text encoding with a transformers language model: its hidden states, one row per caption.

Standalone: it imports only torch, transformers and the standard library, because the export copies it into
every export folder beside the loader (`text2img.pipeline`), where it runs without text2img. `HFTextEncoder`
encodes with these same functions, so an exported encoder cannot drift from the trained one.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from itertools import groupby

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AutoConfig, AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
from transformers.utils import cached_file


def load_gguf(
    name_or_path: str, gguf_file: str, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Dequantise a GGUF checkpoint into a plain base model (no LM head) and its tokenizer.

    Not `from_pretrained(gguf_file=...)`: in transformers 5 that requires `accelerate`. Building the model
    from the GGUF's config and loading its dequantised tensors gives bit-identical weights.
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
            f"(e.g. {missing[0]}); convert the model to safetensors and load that folder instead"
        )
    return tokenizer, model.eval()


def load_text_model(
    name_or_path: str, dtype: torch.dtype = torch.float32, gguf_file: str | None = None, trust_remote_code: bool = False
) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    """Tokenizer and base model from a hub name or a local folder (optionally a GGUF file in it)."""
    if gguf_file:
        return load_gguf(name_or_path, gguf_file, dtype)
    remote = {"trust_remote_code": trust_remote_code}
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **remote)
    return tokenizer, AutoModel.from_pretrained(name_or_path, dtype=dtype, **remote)


def prepare_text_model(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel, name: str) -> None:
    """Right padding (a caption's real positions then do not depend on its batch), a pad token, no KV cache."""
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{name}'s tokenizer has neither a pad nor an eos token; pick another model")
        tokenizer.pad_token = tokenizer.eos_token
    model.config.use_cache = False


def tokenize(
    tokenizer: PreTrainedTokenizerBase,
    captions: Sequence[str],
    *,
    template: str,
    max_length: int,
    chat_template: bool = False,
    system_prompt: str | None = None,
) -> tuple[list[dict[str, list[int]]], int]:
    """Token ids per caption, unpadded, and how many captions `max_length` cut.

    With `chat_template`, the templated caption becomes the user turn of the tokenizer's chat template
    (after a system turn holding `system_prompt`, if set), ending with the assistant prompt so that the last
    token is where the model starts its reply. The rendered text carries its own special tokens, so none are
    added. Truncation keeps the start: a caption too long for `max_length` loses its end and the template's.
    """
    texts = [template.replace("{caption}", caption) for caption in captions]
    if chat_template:
        system = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
        texts = [
            tokenizer.apply_chat_template(
                [*system, {"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            for text in texts
        ]
    special = {"add_special_tokens": not chat_template}
    truncated = sum(len(ids) > max_length for ids in tokenizer(texts, **special)["input_ids"])
    encoded = tokenizer(texts, truncation=True, max_length=max_length, **special)
    features = [{key: encoded[key][i] for key in encoded} for i in range(len(texts))]
    fallback = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    for row in features:
        if not row["input_ids"]:
            # An empty prompt would be an all-padding row (NaN attention downstream): give it one token.
            row.update({key: [0] for key in row}, input_ids=[fallback], attention_mask=[1])
    return features, truncated


def pool_hidden(hidden: Tensor, mask: Tensor, pooling: str) -> Tensor:
    """One vector per row: the last real token's state ("last") or the mean over real tokens ("mean")."""
    if pooling == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), mask.sum(1) - 1]
    return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


def encode_tokens(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    features: Sequence[dict[str, list[int]]],
    *,
    max_length: int,
    hidden_index: int,
    layer_mean: int = 1,
    pooling: str,
    batch_size: int,
    device: torch.device | str = "cpu",
    grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """tokens [B, max_length, D] (zero at padding), mask [B, max_length] bool, pooled [B, D], float32, from
    `tokenize`'s features.

    The hidden state is the mean of the `layer_mean` consecutive entries of the model's `hidden_states`
    ending at `hidden_index` (0 = embeddings). Without gradients (the embedding cache, sampling, the
    exported pipeline) a batch holds captions of one token length only, so no caption is padded: a caption's embedding
    is bit for bit its own whatever else is encoded with it (padding moved SmolLM2's deep layers by 5e-5 under
    AVX2 kernels; at a fixed length the batch size changed no bit, measured on both kernel sets), and short
    captions cost no more than their tokens. A training step (`grad` with autograd on) pads each batch to
    its own longest caption, sorted by length, which is cheaper and equal to rounding.
    """
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    if grad and torch.is_grad_enabled():
        batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    else:
        batches = []
        for _, same_length in groupby(order, key=lambda i: len(features[i]["input_ids"])):
            rows = list(same_length)
            batches += [rows[start : start + batch_size] for start in range(0, len(rows), batch_size)]
    tokens, masks, pooled = [], [], []
    with nullcontext() if grad else torch.inference_mode():
        for indices in batches:
            rows = [features[i] for i in indices]
            batch = tokenizer.pad(rows, padding=True, return_tensors="pt").to(device)
            out = model(**batch, output_hidden_states=True)
            read = out.hidden_states[hidden_index - layer_mean + 1 : hidden_index + 1]
            # Averaged in float32, so a single layer (layer_mean=1) is exactly that layer's state.
            hidden = torch.stack([state.float() for state in read]).mean(0)
            mask = batch["attention_mask"].bool()
            # `where`, not a product: padded positions of some attention kernels are NaN.
            hidden = torch.where(mask[..., None], hidden, 0.0)
            pad = max_length - mask.shape[1]
            tokens.append(F.pad(hidden, (0, 0, 0, pad)))
            masks.append(F.pad(mask, (0, pad)))
            pooled.append(pool_hidden(hidden, mask, pooling))
    # Built outside inference mode, so the result is an ordinary tensor that autograd may save.
    restore = torch.argsort(torch.tensor(order, device=device))
    return torch.cat(tokens)[restore], torch.cat(masks)[restore], torch.cat(pooled)[restore]
