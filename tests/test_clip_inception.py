"""Inception extractor errors, classifier logits of the extractors, and CLIPScore on a tiny local CLIP.

No network and no torch-fidelity here: the Inception tests check the one-line errors (missing or broken
dependency, missing weights); CLIPScore runs on a random CLIP saved to a temporary folder.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F
from torchmetrics.utilities import dim_zero_sum
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from conftest import write_imagefolder
from text2img.errors import ConfigError
from text2img.metrics import InceptionFeatures, LocalCLIPScore
from text2img.networks import EfficientNetLite0Features

WEIGHTS_NAME = "weights-inception-2015-12-05-6726825d.pth"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def broken_torch_fidelity(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A torch_fidelity whose import fails the way it does with a torchvision built for another torch."""
    package = tmp_path / "site" / "torch_fidelity"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    for name in ("torch_fidelity", "torch_fidelity.feature_extractor_inceptionv3"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(package.parent))


@pytest.mark.parametrize("failure", ["absent", "broken"])
def test_inception_without_torch_fidelity_says_what_is_missing(
    failure: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if failure == "absent":
        monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # None in sys.modules: ImportError
    else:
        broken_torch_fidelity(monkeypatch, tmp_path)
    with pytest.raises(ConfigError) as error:
        InceptionFeatures()
    assert str(error.value) == (
        "extractor=inception needs torch-fidelity with a working torchvision (pip install torch-fidelity) "
        f"and the FID Inception weights ({WEIGHTS_NAME}, or set extractor.weights_path); "
        "use extractor=effnet_lite0 offline"
    )


@pytest.fixture
def importable_torch_fidelity(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """torch_fidelity imports, but its weights URL cannot be fetched; returns that URL."""
    url = (tmp_path / "unreachable" / WEIGHTS_NAME).as_uri()
    package = types.ModuleType("torch_fidelity")
    package.__path__ = []
    module = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    module.URL_INCEPTION_V3 = url
    monkeypatch.setitem(sys.modules, "torch_fidelity", package)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", module)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # torch.hub's cache, where it looks first
    return url


def test_inception_without_weights_names_the_file(importable_torch_fidelity: str, tmp_path: Path) -> None:
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / WEIGHTS_NAME
    with pytest.raises(ConfigError) as error:
        InceptionFeatures()
    assert str(error.value) == (
        f"extractor=inception: no Inception weights at {cached} and downloading {importable_torch_fidelity} "
        "failed; put the file there or set extractor.weights_path; use extractor=effnet_lite0 offline"
    )

    missing = tmp_path / "inception.pth"
    with pytest.raises(ConfigError) as error:
        InceptionFeatures(weights_path=str(missing))
    assert str(error.value) == (
        f"extractor.weights_path={missing}: no such file; point it at the FID Inception weights "
        f"({importable_torch_fidelity}) or use extractor=effnet_lite0 offline"
    )


def shape_images(root: Path, n: int, size: int) -> Tensor:
    """Coloured shapes on white, read back from PNG: float [n,3,size,size] in [0,1]."""
    write_imagefolder(root, n=n, size=size)
    arrays = [np.asarray(Image.open(path).convert("RGB")) for path in sorted(root.glob("*.png"))]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def test_effnet_logits_equal_the_networks_own_forward(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    extractor = EfficientNetLite0Features()
    # Record the preprocessed input that `forward` gives the network, to run the network's full forward on it.
    network_inputs: list[Tensor] = []
    extract_features = extractor.net.extract_features
    monkeypatch.setattr(
        extractor.net, "extract_features", lambda x: network_inputs.append(x) or extract_features(x)
    )
    features = extractor(shape_images(tmp_path, n=4, size=64))
    monkeypatch.undo()
    with torch.no_grad():
        expected = extractor.net(network_inputs[0])

    logits = extractor.logits(features)
    assert logits.shape == (4, extractor.num_classes) and logits.dtype == torch.float32
    assert torch.equal(logits.argmax(1), expected.argmax(1))
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


LETTERS = "abcdefghijklmnopqrstuvwxyz"
CAPTIONS = ["a red square", "a blue circle", "green triangle", "a yellow disc", "red", "the blue one"]


def tiny_clip_folder(root: Path) -> Path:
    """A random 2-layer CLIP with a letter-level BPE tokenizer, saved as a model folder would be."""
    tokenizer_dir = root / "tokenizer"
    tokenizer_dir.mkdir(parents=True)
    vocab = ["<|startoftext|>", "<|endoftext|>", *LETTERS, *(c + "</w>" for c in LETTERS), "re", "red</w>"]
    (tokenizer_dir / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\nr e\nre d</w>\n")
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})

    tiny = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={**tiny, "vocab_size": len(vocab), "max_position_embeddings": 32, "bos_token_id": 0,
                     "eos_token_id": 1, "pad_token_id": 1},
        vision_config={**tiny, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    model_dir = root / "clip"
    CLIPModel(config).save_pretrained(model_dir)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_clip_folder(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def clip_score(clip_dir: Path) -> LocalCLIPScore:
    return LocalCLIPScore(str(clip_dir))


def smooth_images(n: int, size: int = 40) -> Tensor:
    g = torch.Generator().manual_seed(1)
    return F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(size, size), mode="bicubic").clamp(0, 1)


def manual_clip_score(clip_dir: Path, images: Tensor, captions: list[str]) -> Tensor:
    """torchmetrics' definition through CLIPModel.forward: max(mean(100 * cos(image, caption)), 0)."""
    model, processor = CLIPModel.from_pretrained(clip_dir), CLIPProcessor.from_pretrained(clip_dir)
    pixels = list((images * 255).round().to(torch.uint8))  # the metric scores 8-bit images
    inputs = processor(text=captions, images=pixels, return_tensors="pt", padding=True)
    with torch.no_grad():
        output = model(**inputs)
    cosine = F.cosine_similarity(output.image_embeds, output.text_embeds, dim=-1)
    return (100 * cosine).mean().clamp(min=0)


def test_clip_score_matches_manual_computation(clip_score: LocalCLIPScore, clip_dir: Path) -> None:
    images = smooth_images(len(CAPTIONS))
    clip_score.reset()
    clip_score.update(images, CAPTIONS)
    score = clip_score.compute()

    expected = manual_clip_score(clip_dir, images, CAPTIONS)
    assert expected > 0  # a positive mean, so the comparison is not 0 == 0
    torch.testing.assert_close(score, expected, atol=1e-4, rtol=1e-4)
    assert clip_score.metric_name == "clip_score"
    assert clip_score._reductions == {"score": dim_zero_sum, "n_samples": dim_zero_sum}


def test_clip_score_streams_over_batches(clip_score: LocalCLIPScore) -> None:
    images = smooth_images(len(CAPTIONS))
    clip_score.reset()
    clip_score.update(images, CAPTIONS)
    whole = clip_score.compute()

    clip_score.reset()
    clip_score.update(images[:2], CAPTIONS[:2])
    clip_score.update(images[2:], CAPTIONS[2:])
    assert clip_score.n_samples == len(CAPTIONS)
    torch.testing.assert_close(clip_score.compute(), whole, atol=1e-4, rtol=1e-4)


def test_clip_score_stays_frozen_in_eval_mode(clip_score: LocalCLIPScore) -> None:
    clip_score.train()  # what Lightning does to the module owning the metric
    assert not any(module.training for module in clip_score.model.modules())
    assert not any(p.requires_grad for p in clip_score.model.parameters())


def test_clip_score_missing_folder_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "clip-vit-large-patch14"
    with pytest.raises(ConfigError) as error:
        LocalCLIPScore(str(missing))
    assert str(error.value) == (
        f"clip_score: no CLIP model at '{missing}': save a transformers CLIPModel and its CLIPProcessor "
        "there (model.save_pretrained(path); processor.save_pretrained(path)), or name a hub model such as "
        "openai/clip-vit-large-patch14 when online"
    )


def test_clip_score_option_from_the_metrics_config(clip_dir: Path, tmp_path: Path) -> None:
    """`metrics=[clip_score] metrics.clip_score.model=DIR` builds a metric the Evaluation callback can feed."""
    from hydra.utils import instantiate

    from conftest import compose_train, eval_batch

    cfg = compose_train(tmp_path, ["metrics=[clip_score]", f"metrics.clip_score.model={clip_dir}"])
    metric = instantiate(cfg.metrics.clip_score)
    images = smooth_images(len(CAPTIONS))
    for _ in range(2):  # the second round checks that reset() clears the wrapped CLIPScore too
        metric.update(eval_batch(images, CAPTIONS))
        figures = metric.compute()
        metric.reset()
    torch.testing.assert_close(figures["clip_score"], manual_clip_score(clip_dir, images, CAPTIONS), atol=1e-4, rtol=1e-4)
