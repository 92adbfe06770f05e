"""A corpus of bad data and bad command lines (issue 15): none ends in a traceback. Each stops with one line
`text2img: error: ...` naming the key or file and the fix, or, for a single bad sample, is skipped and counted
with a warning while the run goes on; awkward but valid input (BOMs, CRLF, odd image modes) just works."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from hydra.utils import instantiate
from PIL import Image

from conftest import compose_train, smoke_overrides, write_imagefolder
from text2img.data import ImageFolderSource
from text2img.train import train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def one_line(out, *says: str) -> str:
    """The error line of a command that had to stop: exit 1, no traceback, one `text2img: error:` line."""
    text = out.stdout + out.stderr
    assert "Traceback" not in text, text
    assert out.returncode == 1, text
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("text2img: error: "), text
    for part in says:
        assert part in line, line
    return line


# ---------------------------------------------------------------- image folders


def write_metadata(root: Path, rows: list[dict], newline: str = "\n", prefix: str = "") -> Path:
    (root / "metadata.jsonl").write_bytes((prefix + newline.join(json.dumps(row) for row in rows) + newline).encode())
    return root


def odd_images(root: Path) -> list[dict]:
    """One image of every mode PIL reads that is not plain RGB, and their metadata rows."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = {
        "grey.png": Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8), "L"),
        "palette.png": Image.new("RGB", (24, 24), "teal").convert("P", palette=Image.Palette.ADAPTIVE),
        "cmyk.jpg": Image.new("CMYK", (24, 24), (0, 200, 100, 20)),
        "sixteen.png": Image.fromarray(rng.integers(0, 65535, (24, 24), dtype=np.uint16)),
        "rgba.png": Image.new("RGBA", (24, 24), (255, 0, 0, 90)),
        "grey-alpha.png": Image.new("LA", (24, 24), (30, 128)),
        "bilevel.png": Image.new("1", (24, 24), 1),
        "tall.webp": Image.new("RGB", (10, 40), "orange"),
        "large.jpg": Image.new("RGB", (4000, 3000), "navy"),
    }
    for name, image in images.items():
        image.save(root / name)
    return [{"file_name": name, "text": f"an image {name}"} for name in images]


def test_every_image_mode_and_a_large_image_load(tmp_path):
    rows = odd_images(tmp_path)
    source = ImageFolderSource(write_metadata(tmp_path, rows), image_size=16, val_fraction=0, test_fraction=0)
    assert len(source) == len(rows)
    images = torch.stack([image for image, _ in source.split("train")])
    assert images.shape == (len(rows), 3, 16, 16) and images.min() >= -1 and images.max() <= 1


def test_an_image_above_pils_bomb_limit_loads(tmp_path, monkeypatch):
    """PIL refuses images above 2 x MAX_IMAGE_PIXELS (179 MP) as decompression bombs; a user's own scan is no bomb."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    write_imagefolder(tmp_path, n=3)
    source = ImageFolderSource(tmp_path, image_size=8, val_fraction=0, test_fraction=0)
    assert len(source) == 3 and source.split("train")[0][0].shape == (3, 8, 8)


@pytest.mark.parametrize(("newline", "prefix"), [("\r\n", ""), ("\n", "\ufeff"), ("\r\n", "\ufeff")],
                         ids=["crlf", "bom", "bom+crlf"])
def test_windows_metadata_just_works(tmp_path, caplog, newline, prefix):
    write_imagefolder(tmp_path, n=4)
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    write_metadata(tmp_path, rows, newline, prefix)
    with caplog.at_level(logging.WARNING):
        source = ImageFolderSource(tmp_path, image_size=8, val_fraction=0, test_fraction=0)
    assert source.captions == [row["text"] for row in rows] and not caplog.messages


def test_duplicate_lines_folders_and_blank_captions_are_skipped_and_counted(tmp_path, caplog):
    write_imagefolder(tmp_path, n=4)
    (tmp_path / "sub").mkdir()
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    rows += [rows[1], {"file_name": "sub", "text": "a folder"}, {"file_name": "002.png", "text": " \t\u3000 "},
             {"file_name": "002.png", "text": "the same image, another caption"}]
    write_metadata(tmp_path, rows)
    with caplog.at_level(logging.WARNING):
        source = ImageFolderSource(tmp_path, image_size=8, val_fraction=0, test_fraction=0)
    assert len(source) == 5
    assert caplog.messages == [
        f"imagefolder: skipped 3 of 8 samples of {tmp_path / 'metadata.jsonl'} (duplicate line: line 5; "
        f"not an image file: line 6; empty caption: line 7)"
    ]


@pytest.mark.parametrize(
    ("layout", "says"),
    [
        ("empty metadata", "metadata.jsonl lists no images; add a line per image like"),
        ("blank metadata", "metadata.jsonl lists no images; add a line per image like"),
        ("no metadata", "no metadata.jsonl in data.source.path="),
        ("only folders", "none of the 2 samples of"),
    ],
)
def test_unusable_folders_are_one_line(tmp_path, entry_point, layout, says):
    data = tmp_path / "data"
    write_imagefolder(data, n=4)
    if layout == "empty metadata":
        (data / "metadata.jsonl").write_bytes(b"")
    elif layout == "blank metadata":
        (data / "metadata.jsonl").write_bytes(b"\xef\xbb\xbf\r\n \t\n\n")
    elif layout == "no metadata":
        (data / "metadata.jsonl").unlink()
    else:
        (data / "a").mkdir()
        (data / "b").mkdir()
        write_metadata(data, [{"file_name": "a", "text": "a"}, {"file_name": "b", "text": "b"}])
    out = entry_point("train", *smoke_overrides(data), f"hydra.run.dir={tmp_path / 'run'}")
    one_line(out, says)


def test_a_caption_longer_than_the_encoder_reads_is_truncated_with_a_warning(tmp_path, caplog):
    cfg = compose_train(tmp_path, ["debug=smoke"])
    encoder = instantiate(cfg.encoder)
    with caplog.at_level(logging.WARNING):
        text = encoder.encode(["a red square " * 500, "short"])
    assert text.tokens.shape[1] <= cfg.encoder.max_length
    assert any(f"1 of 2 captions truncated to max_length={cfg.encoder.max_length}" in m for m in caplog.messages)


def test_an_image_that_stops_decoding_is_one_line_also_from_a_dataloader_worker(tmp_path):
    from torch.utils.data import DataLoader

    from text2img.errors import DataError, message_of

    source = ImageFolderSource(write_imagefolder(tmp_path, n=2), image_size=8, val_fraction=0, test_fraction=0)
    (tmp_path / "001.png").write_bytes(b"overwritten after the up-front check")
    expected = f"imagefolder: cannot decode {tmp_path / '001.png'} ("
    with pytest.raises(DataError) as error:
        list(DataLoader(source.split("train"), batch_size=2, num_workers=1))
    assert "\n" in str(error.value)  # torch wraps it in the worker's traceback
    assert message_of(error.value).startswith(expected) and "\n" not in message_of(error.value)


# ---------------------------------------------------------------- webdataset shards


def png_bytes(colour: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def write_shard(path: Path, count: int, bad_caption: bool = False) -> Path:
    with wds.TarWriter(str(path)) as tar:
        for i in range(count):
            caption = "caf\u00e9".encode("latin-1") if bad_caption and i == count - 1 else f"a square {i}".encode()
            tar.write({"__key__": f"{i:04d}", "png": png_bytes(("red", "blue")[i % 2]), "txt": caption})
    return path


def write_bad_shard(path: Path, kind: str) -> Path:
    if kind == "zero bytes":
        path.write_bytes(b"")
    elif kind == "no members":
        tarfile.open(path, "w").close()
    elif kind == "not a tar":
        path.write_bytes(b"<html>404 not found</html>" * 40)
    elif kind == "no images":
        with wds.TarWriter(str(path)) as tar:
            tar.write({"__key__": "0", "txt": b"a caption without its image"})
    return path


def webdataset_args(tmp_path: Path, train: Path, val: Path, *extra: str) -> list[str]:
    return ["debug=smoke", "data=webdataset", f"data.source.train_shards={train}", f"data.source.val_shards={val}",
            f"data.source.test_shards={val}", "data.num_workers=0", "test=false", f"hydra.run.dir={tmp_path / 'run'}",
            f"data.embedding_cache_dir={tmp_path / 'embeddings'}",
            f"callbacks.evaluation.cache_dir={tmp_path / 'eval-cache'}", *extra]


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("missing", "data.source.val_shards: 1 of 1 shards do not exist (e.g. '{shard}'); check the path"),
        ("zero bytes", "webdataset: shard '{shard}' of data.source.val_shards cannot be read (empty file: not a tar"),
        ("not a tar", "webdataset: shard '{shard}' of data.source.val_shards cannot be read (invalid header"),
        ("no members", "webdataset: data.source.val_shards hold no usable sample (the shards are empty); each sample"),
        ("no images", "webdataset: data.source.val_shards hold no usable sample (skipped no image: 1); each sample"),
    ],
)
def test_bad_shards_are_one_line(tmp_path, entry_point, kind, says):
    train_shard = write_shard(tmp_path / "train.tar", 16)
    shard = write_bad_shard(tmp_path / "val.tar", kind)
    out = entry_point("train", *webdataset_args(tmp_path, train_shard, shard))
    one_line(out, says.format(shard=shard))


@pytest.mark.parametrize("workers", [0, 1])
def test_strict_refuses_a_training_sample_in_one_line(tmp_path, entry_point, workers):
    """The training stream is read as the fit runs, with workers in other processes."""
    train_shard = write_shard(tmp_path / "train.tar", 16, bad_caption=True)
    val_shard = write_shard(tmp_path / "val.tar", 4)
    args = webdataset_args(tmp_path, train_shard, val_shard, "data.source.strict=true", f"data.num_workers={workers}",
                           "data.source.reference_samples=4")
    line = one_line(entry_point("train", *args), f"webdataset: sample '0015' of shard '{train_shard}' is unusable")
    assert line.endswith("or set data.source.strict=false to skip unusable samples with a warning")


# ---------------------------------------------------------------- what the best checkpoint monitors


def test_an_optimized_metric_no_chosen_metric_computes_is_one_line(tmp_path):
    from text2img.run.config_checks import check_config
    from text2img.errors import ConfigError

    cfg = compose_train(tmp_path, ["debug=smoke", "optimized_metric=val/r_precision", "optimized_mode=max"])
    with pytest.raises(ConfigError) as error:
        check_config(cfg)
    assert str(error.value) == (
        "optimized_metric='val/r_precision' is not a validation figure of metrics=[image], which log val/fid_effnet, "
        "val/kid_effnet, val/is_effnet; set optimized_metric to one of them, or add the metric that computes it to "
        "metrics="
    )
    for fine in (["extractor=inception", "optimized_metric=val/kid_inception"], ["optimized_metric=train/loss"],
                 ["metrics=[alignment,diversity]", "optimized_metric=val/diversity_ratio_effnet"]):
        check_config(compose_train(tmp_path, ["debug=smoke", *fine]))


class Collected(logging.Handler):
    """The messages logged while it is attached to the root logger (caplog is per test; this serves a module)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A smoke run on 16 images (12 train, 3 val, 1 test) that validates on one generated image, too few for FID,
    its best checkpoint's monitor: its last checkpoint and its warnings."""
    root = tmp_path_factory.mktemp("corpus")
    data = write_imagefolder(root / "data", n=16)
    overrides = smoke_overrides(data, "logger=csv", "test=false", "data.source.val_fraction=0.3",
                                "data.source.test_fraction=0.05", "data.val_samples=1", "trainer.max_steps=3",
                                f"data.embedding_cache_dir={root / 'embeddings'}")
    collected = Collected()
    logging.getLogger().addHandler(collected)
    try:
        assert train(compose_train(root / "run", overrides)) is None  # no FID to return
    finally:
        logging.getLogger().removeHandler(collected)
    return root / "run" / "checkpoints" / "last.ckpt", collected.messages


def test_a_validation_without_the_monitored_figure_warns_once_and_goes_on(trained):
    checkpoint, messages = trained
    assert checkpoint.is_file() and not list(checkpoint.parent.glob("best-*"))
    assert [m for m in messages if m.startswith("best checkpoint:")] == [
        "best checkpoint: this validation did not compute val/fid_effnet (see the metrics' warnings), so it cannot "
        "be the best checkpoint; the run goes on, and checkpoints/last.ckpt is saved as usual"
    ]


@pytest.fixture(scope="module")
def gan_checkpoint(trained, tmp_path_factory) -> Path:
    """The trained checkpoint with its run config naming the GAN backend: what export reads before building it."""
    checkpoint = torch.load(trained[0], map_location="cpu", weights_only=True)
    checkpoint["text2img_config"]["generator"]["_target_"] = "text2img.generators.GANGenerator"
    path = tmp_path_factory.mktemp("gan") / "gan.ckpt"
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize(
    ("entry", "args", "says"),
    [
        # wrong types and unknown keys
        ("train", ["data.batch_size=abc"], "data.batch_size='abc' is invalid; set data.batch_size to an integer >= 1"),
        ("train", ["seed=1.5"], "seed=1.5 is invalid; set seed to an integer >= 0"),
        ("sample", ["ckpt={ckpt}", "prompts=[a]", "n=-1"], "n=-1 must be at least 1"),
        ("sample", ["ckpt={ckpt}", "prompts=[a]", "n=abc"], "n='abc' is invalid; set n to an integer"),
        ("sample", ["ckpt={ckpt}", "prompts=[a]", "seed=1.5"], "seed=1.5 is invalid; set seed to an integer >= 0"),
        ("sample", ["ckpt={ckpt}", "prompts=[a]", "guidance=strong"],
         "guidance='strong' is invalid; set guidance to a number, or null"),
        ("sample", ["ckpt={ckpt}", "prompts=[]"], "prompts=[] gives no prompt; pass a list, e.g. prompts="),
        ("sample", ["ckpt={ckpt}", "prompts=''"], "prompts[0]='' is not a prompt; every prompt must be non-empty text"),
        ("sample", ["ckpt={ckpt}", "prompts=[a,' ']"], "prompts[1]=' ' is not a prompt"),
        ("evaluate", ["ckpt={ckpt}", "n_samples=-1"], "n_samples=-1 is invalid; set n_samples to an integer >= 1"),
        ("evaluate", ["ckpt={ckpt}", "guidance_scale=abc"], "guidance_scale='abc' is invalid"),
        ("evaluate", ["ckpt={ckpt}", "split=train"], "split='train' is invalid; set split to one of test, val"),
        ("export", ["ckpt={ckpt}", "out={tmp}/out", "copy_encoder=maybe"],
         "copy_encoder='maybe' is invalid; set copy_encoder to true or false"),
        # checkpoints that are not
        ("sample", ["ckpt={tmp}", "prompts=[a]"], "ckpt='{tmp}' is a folder; pass a .ckpt written by text2img.train"),
        ("evaluate", ["ckpt={tmp}"], "ckpt='{tmp}' is a folder"),
        ("export", ["ckpt={tmp}", "out={tmp}/out"], "ckpt='{tmp}' is a folder"),
        ("sample", ["ckpt={text}", "prompts=[a]"], "ckpt='{text}' is not a text2img checkpoint (unreadable"),
        ("evaluate", ["ckpt={text}"], "ckpt='{text}' is not a text2img checkpoint (unreadable"),
        ("export", ["ckpt={gan}", "out={tmp}/out"],
         "export writes diffusion models (generator=diffusion or generator=ldm); ckpt='{gan}' holds a GANGenerator"),
        # outputs that are files
        ("sample", ["ckpt={ckpt}", "prompts=[a]", "out={text}"], "out='{text}' is a file; pass a folder"),
        ("evaluate", ["ckpt={ckpt}", "out={tmp}"], "out='{tmp}' is a folder; pass the path of the JSON report"),
        ("export", ["ckpt={ckpt}", "out={text}"], "out='{text}' is a file; pass a folder"),
    ],
)
def test_bad_command_lines_are_one_line(tmp_path, entry_point, trained, gan_checkpoint, entry, args, says):
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    names = {"ckpt": trained[0], "tmp": tmp_path, "text": text, "gan": gan_checkpoint}
    out = entry_point(entry, *(arg.format(**names) for arg in args), f"hydra.run.dir={tmp_path / 'hydra'}")
    one_line(out, says.format(**names))


def test_an_unknown_key_is_hydras_short_message(tmp_path, entry_point):
    out = entry_point("train", "debug=smoke", "trainer.max_stepz=3", f"hydra.run.dir={tmp_path}")
    text = out.stdout + out.stderr
    assert out.returncode == 1 and "Traceback" not in text
    assert "Could not override 'trainer.max_stepz'" in text and len(text.strip().splitlines()) <= 8, text


def test_evaluating_a_split_too_small_says_so(tmp_path, entry_point, trained):
    out = entry_point("evaluate", f"ckpt={trained[0]}", f"out={tmp_path / 'report.json'}", "metrics=[image]")
    one_line(out, "split=test: the checkpoint's test split has 1 image(s), too few to evaluate", "try split=val")
