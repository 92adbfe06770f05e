"""Bad and awkward input data never ends in a traceback: tiny and class-captioned data sets train and evaluate,
bad samples are skipped and counted (or refused with data.source.strict=true), empty splits are a warning
(evaluation) or one line (training)."""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from conftest import compose_train, smoke_overrides, write_imagefolder
from text2img.data import ImageFolderSource, WebDatasetSource
from text2img.networks.lit import shuffled_prompts
from text2img.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DEFAULT_METRICS = "metrics=[image,alignment,attributes,reconstruction]"
# A small alignment evaluator: the default one trains 300 steps (still seconds, but tests add up).
SMALL_LIT = ["metrics.alignment.config.steps=20", "metrics.alignment.config.whiten_dim=16"]


def csv_metrics(run_dir: Path) -> set[str]:
    """The metric names a run's CSV logger wrote."""
    return set((run_dir / "csv" / "metrics.csv").read_text().splitlines()[0].split(","))


def one_line_error(exc: pytest.ExceptionInfo[SystemExit]) -> str:
    message = str(exc.value.code)
    assert message.startswith("text2img: error: ") and "\n" not in message, message
    return message


def write_classes(root: Path, classes: list[str], per_class: int) -> Path:
    """A class-captioned folder: `per_class` images of each class, all captioned "a photo of a <class>"."""
    root.mkdir(parents=True)
    lines = []
    for c, name in enumerate(classes):
        for i in range(per_class):
            file = f"{c}-{i}.png"
            Image.new("RGB", (16, 16), (20 * c, 10 * i, 128)).save(root / file)
            lines.append(json.dumps({"file_name": file, "text": f"a photo of a {name}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


# ---------------------------------------------------------------- tiny and class-captioned data


def test_ten_images_train_and_evaluate_with_the_default_metrics(tmp_path, caplog):
    data = write_imagefolder(tmp_path / "data", n=10)  # 5 train, 2 val, 3 test images at 0.2 / 0.4
    overrides = smoke_overrides(data, DEFAULT_METRICS, *SMALL_LIT, "logger=csv", "data.source.test_fraction=0.4")
    cfg = compose_train(tmp_path / "run", overrides)
    with caplog.at_level(logging.WARNING):
        value = train(cfg)
    assert value is not None and math.isfinite(value)
    assert "data: the train split has 5 images, fewer than data.batch_size=8: training uses batches of 5" in caplog.messages
    metrics = csv_metrics(tmp_path / "run")
    for stage in ("val", "test"):
        assert {f"{stage}/fid_effnet", f"{stage}/r_precision", f"{stage}/r_precision_shuffled"} <= metrics


def test_class_captioned_data_evaluates_alignment(tmp_path, caplog):
    # 10 classes, 5 images each, one caption per class: 3 classes land in val, 3 in test at 0.3 / 0.2
    classes = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]
    data = write_classes(tmp_path / "data", classes, per_class=5)
    overrides = smoke_overrides(
        data, "metrics=[alignment]", *SMALL_LIT, "logger=csv", "data.source.val_fraction=0.3",
        "optimized_metric=val/r_precision", "optimized_mode=max", "test=false",
    )
    with caplog.at_level(logging.WARNING):
        train(compose_train(tmp_path / "run", overrides))
    assert "alignment: the val split has 3 distinct prompts, fewer than k=32; R-precision uses k=3" in caplog.messages
    metrics = csv_metrics(tmp_path / "run")
    assert {"val/clip_score_lit_shuffled", "val/r_precision_shuffled", "val/r_precision_real"} <= metrics


def test_shuffled_prompts_are_never_the_own_and_ignore_batching():
    own = torch.tensor([0] * 10 + [1] * 10 + [2] * 3)  # few distinct prompts, one shared by 10 images
    keys = torch.arange(100, 123)
    shuffled = shuffled_prompts(own, keys, candidates=3, seed=0)
    assert (shuffled != own).all() and set(shuffled.tolist()) == {0, 1, 2}
    batches = [shuffled_prompts(own[i : i + 4], keys[i : i + 4], 3, seed=0) for i in range(0, 23, 4)]
    assert torch.equal(torch.cat(batches), shuffled)
    order = torch.randperm(23, generator=torch.Generator().manual_seed(0))
    assert torch.equal(shuffled_prompts(own[order], keys[order], 3, seed=0), shuffled[order])


# ---------------------------------------------------------------- empty splits


def test_an_empty_val_split_skips_validation_and_trains(tmp_path, caplog):
    data = write_imagefolder(tmp_path / "data", n=10)  # 7 train, 3 test images at 0.0 / 0.4
    overrides = smoke_overrides(data, "data.source.val_fraction=0.0", "data.source.test_fraction=0.4", "logger=csv")
    cfg = compose_train(tmp_path / "run", overrides)
    with caplog.at_level(logging.WARNING):
        assert train(cfg) is None  # no validation, so no val/fid_effnet to return
    assert (
        "data: the val split has 0 image(s), too few to evaluate: validation is skipped; raise "
        "data.source.val_fraction (now 0.0) or add images with other captions"
    ) in caplog.messages
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
    metrics = csv_metrics(tmp_path / "run")
    assert "test/fid_effnet" in metrics and not any(name.startswith("val/") for name in metrics)


def test_an_empty_train_split_is_one_line(tmp_path):
    data = write_classes(tmp_path / "data", ["t-shirt", "trouser", "coat", "sandal"], per_class=2)
    overrides = smoke_overrides(data, "data.source.val_fraction=0.5", "data.source.test_fraction=0.49")
    with pytest.raises(SystemExit) as exc:
        train(compose_train(tmp_path / "run", overrides))
    assert one_line_error(exc) == (
        "text2img: error: data: the train split is empty: the captions of all 8 samples fall into val/test "
        "(data.source.val_fraction=0.5, data.source.test_fraction=0.49); lower those fractions or add samples "
        "with other captions"
    )


# ---------------------------------------------------------------- bad samples in an image folder


def write_every_fault(root: Path) -> Path:
    """12 good samples (lines 1-12), then a line for every kind of fault (lines 13-24)."""
    write_imagefolder(root, n=12)
    (root / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(jpeg, format="JPEG")
    (root / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (root / "empty.png").write_bytes(b"")
    rows = [
        {"file_name": "garbage.png", "text": "broken"},  # 13
        {"file_name": "truncated.jpg", "text": "truncated"},  # 14
        {"file_name": "empty.png", "text": "empty file"},  # 15
        {"file_name": "gone.png", "text": "missing"},  # 16
        {"file_name": "../000.png", "text": "outside"},  # 17
        {"file_name": str(root / "000.png"), "text": "absolute"},  # 18
        {"file_name": "001.png", "text": "  "},  # 19
    ]
    lines = [json.dumps(row).encode() for row in rows]
    lines += [
        '{"file_name": "002.png", "text": "caf\u00e9"}'.encode("latin-1"),  # 20: not UTF-8
        b'["003.png", "a list"]',  # 21
        b'{"file_name": "004.png", "text": ',  # 22: broken JSON
        b'{"file_name": "005.png"}',  # 23: no text
        b'{"file_name": "006.png", "text": 7}',  # 24: not a string
    ]
    with (root / "metadata.jsonl").open("ab") as file:
        file.write(b"\n".join(lines) + b"\n")
    return root


def test_every_fault_is_skipped_counted_and_listed_by_line(tmp_path, caplog):
    data = write_every_fault(tmp_path / "data")
    with caplog.at_level(logging.WARNING):
        source = ImageFolderSource(data, image_size=16)
    assert len(source) == 12
    assert caplog.messages == [
        f"imagefolder: skipped 12 of 24 samples of {data / 'metadata.jsonl'} (unreadable image: lines 13, 14, 15; "
        "missing image: line 16; path outside the folder: lines 17, 18; empty caption: line 19; not UTF-8: line 20; "
        "not a JSON object: line 21; invalid JSON: line 22; no string 'text': lines 23, 24)"
    ]
    # and the rest trains
    cfg = compose_train(tmp_path / "run", smoke_overrides(data, "trainer.max_steps=3", "test=false"))
    assert math.isfinite(train(cfg))


def test_strict_refuses_the_first_bad_line(tmp_path):
    data = write_every_fault(tmp_path / "data")
    overrides = smoke_overrides(data, "data.source.strict=true")
    with pytest.raises(SystemExit) as exc:
        train(compose_train(tmp_path / "run", overrides))
    message = one_line_error(exc)
    assert f"imagefolder: {data / 'metadata.jsonl'} line 13: unreadable image: " in message
    assert message.endswith("; fix or remove the line, or set data.source.strict=false to skip unusable samples with a warning")


def test_a_folder_without_a_usable_line_is_one_line(tmp_path):
    (tmp_path / "metadata.jsonl").write_bytes(b"\xff\xfe\n[1]\n")
    with pytest.raises(ValueError, match=r"none of the 2 samples .*\(not UTF-8: line 1; not a JSON object: line 2\)"):
        ImageFolderSource(tmp_path, image_size=16)


# ---------------------------------------------------------------- bad samples in webdataset shards


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "blue").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def bad_shard(tmp_path) -> str:
    path = tmp_path / "val-00000.tar"
    with wds.TarWriter(str(path)) as tar:
        tar.write({"__key__": "good1", "png": png(), "txt": b"a blue square"})
        tar.write({"__key__": "latin1", "png": png(), "txt": "caf\u00e9".encode("latin-1")})
        tar.write({"__key__": "broken", "png": png(), "json": b'{"caption": '})
        tar.write({"__key__": "listed", "png": png(), "json": b'["a list"]'})
        tar.write({"__key__": "good2", "png": png(), "json": b'{"caption": "a second blue square"}'})
    return str(path)


def test_webdataset_skips_and_counts_malformed_captions(bad_shard, caplog):
    source = WebDatasetSource(bad_shard, bad_shard, bad_shard, image_size=8)
    with caplog.at_level(logging.WARNING):
        split = source.split("val")
    assert split.captions == ["a blue square", "a second blue square"]
    assert len(caplog.messages) == 3 and "3 skipped so far" in caplog.messages[-1]
    assert "sample latin1" in caplog.messages[0] and "caption not UTF-8" in caplog.messages[0]
    assert "malformed caption: the .json is not valid JSON" in caplog.messages[1]


def test_webdataset_strict_names_the_shard_and_the_sample(bad_shard):
    source = WebDatasetSource(bad_shard, bad_shard, bad_shard, image_size=8, strict=True)
    with pytest.raises(ValueError) as info:
        source.split("val")
    assert str(info.value) == (
        f"webdataset: sample 'latin1' of shard '{bad_shard}' is unusable (caption not UTF-8: byte 4 of the caption "
        "is not UTF-8); fix or remove it, or set data.source.strict=false to skip unusable samples with a warning"
    )


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (b"{not json", "invalid JSON: Expecting property name enclosed in double quotes; each line must be an object"),
        (b'["a.png", "ok"]', "not a JSON object: each line must be an object like"),
        (b'{"text": "a cat"}', "no string 'file_name': no 'file_name'; each line"),
        (b'{"file_name": "a.png", "text": 3}', "no string 'text': a non-string 'text'; each line"),
        (b'{"file_name": "a.png", "text": "caf\xe9"}', "not UTF-8: byte 36 is not UTF-8; save the file as UTF-8"),
    ],
)
def test_strict_names_what_is_wrong_with_a_line(tmp_path, line, problem):
    (tmp_path / "metadata.jsonl").write_bytes(b"\n" + line + b"\n")
    with pytest.raises(ValueError) as info:
        ImageFolderSource(tmp_path, image_size=8, strict=True)
    assert f"metadata.jsonl line 2: {problem}" in str(info.value) and "\n" not in str(info.value)
