"""A randomly initialised two-layer GPT-2 with a byte-level tokenizer: a fast, offline encoder for tests."""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import GPT2Config, GPT2Model, PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from text2img.encoders.hf import HFTextEncoder

PAD, BOS, EOS = 256, 257, 258
VOCAB_SIZE = 259
POSITIONS = 512  # fixed, so the seeded weights do not depend on max_length


def _byte_symbols() -> list[str]:
    """The printable stand-in that byte-level pre-tokenization uses for each byte (GPT-2's mapping)."""
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    spare = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(spare)) for b in range(256)]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """UTF-8 byte b is token b; 256/257/258 are pad/bos/eos; every sequence starts with bos."""
    vocab = {symbol: byte for byte, symbol in enumerate(_byte_symbols())}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<pad>", "<bos>", "<eos>"])
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


class TinyEncoder(HFTextEncoder):
    """Deterministic for a given `seed` and `hidden_size`; builds in milliseconds."""

    def __init__(self, hidden_size: int = 64, max_length: int = 16, seed: int = 0, **options: Any) -> None:
        """`options`: the rest of `HFTextEncoder`'s arguments (layer, layer_mean, template, chat_template...)."""
        super().__init__(
            model=f"tiny-gpt2-{hidden_size}d-seed{seed}", hidden_size=hidden_size, max_length=max_length, **options
        )
        self.seed = seed

    def reference(self) -> None:
        return None  # random weights built in code: an export must copy them

    def text_config(self) -> GPT2Config:
        return GPT2Config(
            n_layer=2, n_embd=self.hidden_size, n_head=2, n_positions=POSITIONS, vocab_size=VOCAB_SIZE,
            bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD,
        )

    def _load_pretrained(self) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
        # Seed a private RNG stream so building the encoder leaves the caller's random state alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = GPT2Model(self.text_config())
        return byte_tokenizer(), model.eval()
