"""Prompt expansion: an instruct causal LM rewrites a short caption into a more detailed one, cached on disk."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from text2img.utils.files import atomic_path
from text2img.utils.progress import Progress

log = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = "Describe an emoji of '{caption}' in one detailed sentence: its shapes, colours and objects."


class PromptExpander:
    """Rewrites captions with an instruct causal LM: greedy decoding of at most `max_new_tokens` tokens
    answering `instruction` (with `{caption}` replaced) as the user turn of the model's chat template.

    Greedy decoding makes an expansion a function of the caption and `identity()` alone, so expansions are
    cached in `<cache_dir>/<hash of identity>/*.json` and the model is loaded only for captions never
    expanded before. An empty output falls back to the caption itself (with a warning).

    model: a hub name or local folder of an instruct causal LM; null = the packaged SmolLM2-135M-Instruct,
        converted once into `models_dir` (the folder `SmolLM2Encoder` uses).
    train / sample: expand the training captions / the evaluation and sampling prompts.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        model: str | None = None,
        instruction: str = DEFAULT_INSTRUCTION,
        system_prompt: str | None = None,
        max_new_tokens: int = 48,
        batch_size: int = 16,
        train: bool = True,
        sample: bool = True,
        models_dir: str | Path = "~/.cache/text2img/models",
    ) -> None:
        if "{caption}" not in instruction:
            raise ValueError(
                f"prompt_expansion.instruction={instruction!r} lacks '{{caption}}'; add it where the caption goes"
            )
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError(
                f"prompt_expansion.max_new_tokens={max_new_tokens} and prompt_expansion.batch_size={batch_size} "
                "must be >= 1"
            )
        self.cache_dir = Path(cache_dir).expanduser()
        self.model_name = model
        self.instruction = instruction
        self.system_prompt = system_prompt
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.train = train
        self.sample = sample
        self.models_dir = Path(models_dir).expanduser()
        self.model: PreTrainedModel | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None

    @property
    def model_id(self) -> str:
        """The weights' name without machine-specific paths, so cache keys survive moving a folder."""
        if self.model_name is None:
            return self._packaged_smollm2().model_id
        return Path(self.model_name).name if os.path.isdir(self.model_name) else self.model_name

    def _packaged_smollm2(self) -> Any:
        # The encoder knows the package version and where its converted folder lives; building one loads nothing.
        from text2img.encoders.smollm2 import SmolLM2Encoder

        return SmolLM2Encoder(cache_dir=self.models_dir)

    def identity(self) -> dict[str, Any]:
        """Everything an expansion depends on besides the caption; the cache key is a hash of it."""
        return {
            "model": self.model_id,
            "instruction": self.instruction,
            "system_prompt": self.system_prompt,
            "max_new_tokens": self.max_new_tokens,
        }

    @property
    def cache_key(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]

    @property
    def is_loaded(self) -> bool:
        return self.model is not None

    def enabled_for(self, training: bool) -> bool:
        """Whether the training captions (True) or the evaluation and sampling prompts (False) are expanded."""
        return self.train if training else self.sample

    def expand(self, captions: Sequence[str], device: torch.device | str = "cpu") -> list[str]:
        """The expansion of each caption, in order; only captions never expanded before run the model."""
        folder = self.cache_dir / self.cache_key
        unique = list(dict.fromkeys(captions))
        done = self._index(folder)
        if any(caption not in done for caption in unique):
            folder.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.cache_dir / f"{self.cache_key}.lock")):
                done = self._index(folder)  # another process may have expanded them while this one waited
                missing = [caption for caption in unique if caption not in done]
                if missing:
                    self._write_identity(folder)
                    outputs = self.generate(missing, device)
                    self._write_shard(folder, missing, outputs)
                    done.update(zip(missing, outputs))
        empty = [caption for caption in unique if not done[caption]]
        if empty:
            log.warning(
                "prompt expansion: %d of %d outputs were empty (e.g. for %r); those captions are used as they are",
                len(empty), len(unique), empty[0],
            )
        return [done[caption] or caption for caption in captions]

    def generate(self, captions: Sequence[str], device: torch.device | str = "cpu") -> list[str]:
        """Run the model (loading it if needed): one cleaned output per caption, possibly empty."""
        self.load()
        assert self.model is not None and self.tokenizer is not None
        model = self.model.to(device)
        system = [] if self.system_prompt is None else [{"role": "system", "content": self.system_prompt}]
        outputs = []
        with Progress(f"expanding prompts with {self.model_id}", len(captions), "captions") as progress:
            for start in range(0, len(captions), self.batch_size):
                texts = [
                    self.tokenizer.apply_chat_template(
                        [*system, {"role": "user", "content": self.instruction.replace("{caption}", caption)}],
                        tokenize=False, add_generation_prompt=True,
                    )
                    for caption in captions[start : start + self.batch_size]
                ]
                # Left padding: every prompt then ends where generation starts. The template has its special tokens.
                batch = self.tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt").to(device)
                with torch.inference_mode():
                    tokens = model.generate(
                        **batch, do_sample=False, max_new_tokens=self.max_new_tokens,
                        pad_token_id=self.tokenizer.pad_token_id,
                    )
                new_tokens = tokens[:, batch["input_ids"].shape[1] :]
                replies = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                outputs.extend(" ".join(reply.split()) for reply in replies)  # one line, no stray whitespace
                progress.advance(len(replies))
        return outputs

    def load(self) -> None:
        """Load the model now (`expand` does it when some caption is not cached)."""
        if self.model is not None:
            return
        start = time.perf_counter()
        self.tokenizer, self.model = self._load_pretrained()
        if self.tokenizer.chat_template is None:
            raise ValueError(
                f"prompt_expansion.model={self.model_id}'s tokenizer has no chat template; use an instruct model"
            )
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        log.info("Loaded prompt expander %s in %.1f s", self.model_id, time.perf_counter() - start)

    def _load_pretrained(self) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
        if self.model_name is None:
            from text2img.encoders.smollm2 import convert

            path = str(convert(self._packaged_smollm2().converted_dir))
        else:
            path = self.model_name
        # Not text2img.encoders.text_model.load_text_model: it loads the base model, which has no LM head to
        # generate with.
        return AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()

    def unload(self) -> None:
        """Free the model (not needed once every caption is expanded)."""
        self.model = None
        self.tokenizer = None

    @staticmethod
    def _index(folder: Path) -> dict[str, str]:
        """caption -> expansion, from every shard."""
        index: dict[str, str] = {}
        for shard in sorted(folder.glob("*.json")):
            if shard.name != "identity.json":
                index.update(json.loads(shard.read_text()))
        return index

    def _write_identity(self, folder: Path) -> None:
        """identity.json, for people browsing the cache."""
        target = folder / "identity.json"
        if not target.exists():
            self._write_atomic(target, self.identity())

    @classmethod
    def _write_shard(cls, folder: Path, captions: list[str], outputs: list[str]) -> None:
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}.json"
        cls._write_atomic(folder / name, dict(zip(captions, outputs, strict=True)))

    @staticmethod
    def _write_atomic(target: Path, content: dict[str, Any]) -> None:
        # Readers take no lock: a file appears whole or not at all.
        with atomic_path(target) as scratch:
            scratch.write_text(json.dumps(content, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
