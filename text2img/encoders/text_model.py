"""Text encoding with a transformers language model: its hidden states, one row per caption.

Standalone: it imports only torch, transformers and the standard library, because the export copies it into
every export folder beside the loader (`text2img.pipeline`), where it runs without text2img. `HFTextEncoder`
encodes with these same functions, so an exported encoder cannot drift from the trained one.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
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


KEEP_TOKENS = ("all", "caption", "first_and_caption")
COMBINES = ("mean", "concat")


@dataclass
class TokenizedTexts:
    """What `tokenize` gives `encode_tokens`: token ids per text, unpadded, and which of them to keep.

    features:  the tokenizer's rows (input_ids, attention_mask, ...), one per text
    kept:      per text, whether each token survives encoding (None: all do); `keep_tokens="caption"` keeps the
               caption's own tokens and drops the template's and the chat template's
    truncated: how many texts `max_length` cut
    """

    features: list[dict[str, list[int]]]
    kept: list[list[bool]] | None
    truncated: int

    def kept_ids(self, row: int) -> list[int]:
        """The ids of text `row` that its embedding holds, in order."""
        ids = self.features[row]["input_ids"]
        return ids if self.kept is None else [i for i, keep in zip(ids, self.kept[row]) if keep]


def _caption_span(text: str, template: str, caption: str) -> tuple[int, int]:
    """Where the caption sits in `text`, the rendered prompt (template, then maybe the chat template around it)."""
    templated = template.replace("{caption}", caption)
    found = text.rfind(templated)  # the user turn comes after any system turn
    if found < 0:
        raise ValueError(
            f"keep_tokens cannot find the caption {caption!r} in the text the model reads (the chat template changed "
            "it, e.g. stripped its spaces); strip the captions or use keep_tokens=all"
        )
    start = found + template.index("{caption}")
    return start, start + len(caption)


def _kept_tokens(
    offsets: Sequence[tuple[int, int]], span: tuple[int, int], keep_tokens: str
) -> list[bool]:
    """Per token: whether it overlaps the caption's characters (and, with first_and_caption, the first token).
    A text whose caption gives no token (an empty prompt) keeps its last token, so its embedding is never empty."""
    start, end = span
    kept = [token_start < end and token_end > start for token_start, token_end in offsets]
    if keep_tokens == "first_and_caption" and kept:
        kept[0] = True
    if kept and not any(kept):
        kept[-1] = True
    return kept


def tokenize(
    tokenizer: PreTrainedTokenizerBase,
    captions: Sequence[str],
    *,
    template: str,
    max_length: int,
    chat_template: bool = False,
    system_prompt: str | None = None,
    keep_tokens: str = "all",
) -> TokenizedTexts:
    """Token ids per caption, unpadded, which of them `keep_tokens` keeps, and how many captions `max_length` cut.

    With `chat_template`, the templated caption becomes the user turn of the tokenizer's chat template
    (after a system turn holding `system_prompt`, if set), ending with the assistant prompt so that the last
    token is where the model starts its reply. The rendered text carries its own special tokens, so none are
    added. Truncation keeps the start: a caption too long for `max_length` loses its end and the template's.
    `keep_tokens` other than "all" locates the caption's tokens by their character offsets (a fast tokenizer's).
    """
    if keep_tokens not in KEEP_TOKENS:
        raise ValueError(f"keep_tokens={keep_tokens!r} is unknown; use one of {', '.join(KEEP_TOKENS)}")
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
    offsets = keep_tokens != "all"
    if offsets and not tokenizer.is_fast:
        raise ValueError(
            f"keep_tokens={keep_tokens} finds the caption's tokens by character offsets, which "
            f"{type(tokenizer).__name__} (a slow tokenizer) does not give; use keep_tokens=all"
        )
    encoded = tokenizer(texts, truncation=True, max_length=max_length, return_offsets_mapping=offsets, **special)
    names = [key for key in encoded if key != "offset_mapping"]
    features = [{key: encoded[key][i] for key in names} for i in range(len(texts))]
    kept = None
    if offsets:
        kept = [
            _kept_tokens(encoded["offset_mapping"][i], _caption_span(texts[i], template, caption), keep_tokens)
            for i, caption in enumerate(captions)
        ]
    fallback = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    for row, features_row in enumerate(features):
        if not features_row["input_ids"]:
            # An empty prompt would be an all-padding row (NaN attention downstream): give it one token.
            features_row.update({key: [0] for key in features_row}, input_ids=[fallback], attention_mask=[1])
            if kept is not None:
                kept[row] = [True]
    return TokenizedTexts(features, kept, truncated)


def hidden_indices(layers: int | Sequence[int] | str | None, layer: int, layer_mean: int, num_layers: int) -> list[int]:
    """The entries of a model's `hidden_states` (0 = embeddings, `num_layers` = the last block's output) that the
    encoder reads: `layers` as one index, a list of indices or "all" (every block's output, not the embeddings);
    with `layers` None, the `layer_mean` consecutive entries ending at `layer`. Indices may be negative (-1 = last).
    Raises ValueError naming the setting when an index is out of range or repeated."""
    if layers is None:
        end = layer % (num_layers + 1)
        return list(range(end - layer_mean + 1, end + 1))
    if layers == "all":
        return list(range(1, num_layers + 1))
    wanted = [layers] if isinstance(layers, int) else list(layers)
    if not wanted or any(isinstance(index, bool) or not isinstance(index, int) for index in wanted):
        raise ValueError(f"encoder.layers={layers!r} is not an index, a list of indices or all")
    for index in wanted:
        if not -(num_layers + 1) <= index <= num_layers:
            raise ValueError(
                f"encoder.layers holds {index}, out of range for a model of {num_layers} layers; use indices between "
                f"{-(num_layers + 1)} and {num_layers} (0 = embeddings, -1 = last)"
            )
    resolved = [index % (num_layers + 1) for index in wanted]
    if len(set(resolved)) < len(resolved):
        raise ValueError(f"encoder.layers={layers!r} names a layer twice (as {resolved}); list each layer once")
    return resolved


def pool_hidden(hidden: Tensor, mask: Tensor, pooling: str) -> Tensor:
    """One vector per row: the last real token's state ("last") or the mean over real tokens ("mean")."""
    if pooling == "last":
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), mask.sum(1) - 1]
    return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


def _kept_first(hidden: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's kept tokens moved to its front, in order: hidden [B, L, F] and the new mask [B, L]."""
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    return hidden.gather(1, order[..., None].expand_as(hidden)), keep.gather(1, order)


def encode_tokens(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: TokenizedTexts,
    *,
    max_length: int,
    hidden_indices: Sequence[int],
    layer_norm: bool = False,
    combine: str = "mean",
    pooling: str,
    batch_size: int,
    device: torch.device | str = "cpu",
    grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """tokens [B, max_length, F] (zero at padding), mask [B, max_length] bool, pooled [B, F], float32, from
    `tokenize`'s texts.

    The features are the model's `hidden_states` at `hidden_indices` (0 = embeddings), each normalised over its
    features first with `layer_norm` (a LayerNorm without weights: layers differ in scale by orders of magnitude),
    then averaged (`combine="mean"`, F = hidden size) or concatenated (`"concat"`, F = hidden size x layers).
    Tokens that `texts.kept` drops are removed after the model has read them: the kept ones move to the front,
    and the mask and pooled vector follow them.

    Without gradients (the embedding cache, sampling, the exported pipeline) a batch holds captions of one token
    length only, so no caption is padded: a caption's embedding is bit for bit its own whatever else is encoded with
    it (padding moved SmolLM2's deep layers by 5e-5 under AVX2 kernels; at a fixed length the batch size changed no
    bit, measured on both kernel sets), and short captions cost no more than their tokens. A training step (`grad`
    with autograd on) pads each batch to its own longest caption, sorted by length, which is cheaper and equal to
    rounding.
    """
    if combine not in COMBINES:
        raise ValueError(f"combine={combine!r} is unknown; use one of {', '.join(COMBINES)}")
    features = texts.features
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
            # In float32, so a single layer is exactly that layer's state.
            read = [out.hidden_states[index].float() for index in hidden_indices]
            if layer_norm:
                read = [F.layer_norm(state, state.shape[-1:]) for state in read]
            hidden = torch.stack(read).mean(0) if combine == "mean" else torch.cat(read, dim=-1)
            mask = batch["attention_mask"].bool()
            if texts.kept is not None:
                length = mask.shape[1]
                kept = torch.tensor([texts.kept[i] + [False] * (length - len(texts.kept[i])) for i in indices])
                hidden, mask = _kept_first(hidden, mask & kept.to(mask.device))
            # `where`, not a product: padded positions of some attention kernels are NaN.
            hidden = torch.where(mask[..., None], hidden, 0.0)
            pad = max_length - mask.shape[1]
            tokens.append(F.pad(hidden, (0, 0, 0, pad)))
            masks.append(F.pad(mask, (0, pad)))
            pooled.append(pool_hidden(hidden, mask, pooling))
    # Built outside inference mode, so the result is an ordinary tensor that autograd may save.
    restore = torch.argsort(torch.tensor(order, device=device))
    return torch.cat(tokens)[restore], torch.cat(masks)[restore], torch.cat(pooled)[restore]
