"""data=webdataset: img2dataset-layout shards split across ranks and workers, shuffled, broken samples
skipped, end to end training."""

from __future__ import annotations

import io
import json
import logging
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import webdataset as wds
from PIL import Image

from conftest import REPO_ROOT, compose_train
from text2img.data import WebDatasetSource
from text2img.errors import ConfigError
from text2img.lightning import WebDataModule
from text2img.run.compose import build, build_data

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COLOURS = [(220, 30, 30), (30, 180, 60), (30, 60, 220), (240, 210, 20)]
SHARDS, PER_SHARD = 6, 4


def _image_bytes(index: int, fmt: str) -> bytes:
    # not square and not 32 px: the source resizes and crops
    image = Image.new("RGB", (40, 36), COLOURS[index % len(COLOURS)])
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_shards(folder: Path, prefix: str, shards: int, per_shard: int, broken: bool = False) -> set[str]:
    """Shards as img2dataset writes them, captions alternately in .txt and .json; with `broken`, shard 2 also
    holds a sample whose image does not decode and one without a caption. Returns the usable captions."""
    folder.mkdir(parents=True, exist_ok=True)
    captions = set()
    for shard in range(shards):
        with wds.TarWriter(str(folder / f"{prefix}-{shard:05d}.tar")) as tar:
            for i in range(per_shard):
                key = f"{shard:05d}{i:04d}"
                caption = f"a {prefix} square {shard}-{i}"
                if i % 2:
                    meta = {"key": key, "status": "success", "caption": caption}
                    sample = {"jpg": _image_bytes(i, "JPEG"), "json": json.dumps(meta).encode()}
                else:
                    sample = {"png": _image_bytes(i, "PNG"), "txt": caption.encode()}
                sample["__key__"] = key
                tar.write(sample)
                captions.add(caption)
            if broken and shard == 2:
                tar.write({"__key__": "corrupt", "jpg": b"\xff\xd8 not a jpeg", "txt": b"a corrupt sample"})
                uncaptioned = {"png": _image_bytes(0, "PNG"), "json": b'{"status": "success"}'}
                tar.write({"__key__": "uncaptioned", **uncaptioned})
    return captions


@pytest.fixture
def shards(tmp_path: Path) -> SimpleNamespace:
    root = tmp_path / "shards"
    return SimpleNamespace(
        root=root,
        train_captions=write_shards(root, "train", SHARDS, PER_SHARD, broken=True),
        val_captions=write_shards(root, "val", 1, 8),
        test_captions=write_shards(root, "test", 1, 8),
        train=str(root / "train-{00000..00005}.tar"),
        val=str(root / "val-00000.tar"),
        test=str(root / "test-00000.tar"),
    )


def data_overrides(shards: SimpleNamespace, *extra: str) -> list[str]:
    return ["debug=smoke", "data=webdataset", f"data.source.train_shards='{shards.train}'",
            f"data.source.val_shards={shards.val}", f"data.source.test_shards={shards.test}", *extra]


def make_source(shards: SimpleNamespace, **kwargs) -> WebDatasetSource:
    return WebDatasetSource(shards.train, shards.val, shards.test, image_size=32, **kwargs)


def captions_of(stream) -> list[str]:
    return [caption for _, caption, _ in stream]


def test_ranks_and_workers_read_disjoint_shards_covering_every_sample(shards, monkeypatch):
    source = make_source(shards, shuffle_buffer=16)
    seen = {}
    for rank in range(2):
        for worker in range(2):
            # what webdataset's split_by_worker reads in a DataLoader worker
            monkeypatch.setenv("WORKER", str(worker))
            monkeypatch.setenv("NUM_WORKERS", "2")
            captions = captions_of(source.train_stream(rank=rank, world_size=2))
            assert len(captions) == len(set(captions))
            seen[rank, worker] = set(captions)
    assert sum(len(s) for s in seen.values()) == len(shards.train_captions)  # disjoint...
    assert set.union(*seen.values()) == shards.train_captions  # ...and every usable sample once
    # whole shards: ranks take every other shard, then their workers every other of those
    shards_read = {reader: {int(c.split()[-1].split("-")[0]) for c in s} for reader, s in seen.items()}
    assert shards_read == {(0, 0): {0, 4}, (0, 1): {2}, (1, 0): {1, 5}, (1, 1): {3}}


def test_shuffle_buffer_changes_the_order_not_the_set(shards):
    source = make_source(shards, shuffle_buffer=64)
    orders = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        orders.append(captions_of(source.train_stream()))
    assert orders[0] == orders[1], "the order follows torch's seed"
    assert orders[0] != orders[2]
    assert sorted(orders[0]) == sorted(orders[2]) == sorted(shards.train_captions)
    no_shuffle = make_source(shards, shuffle_buffer=0)
    torch.manual_seed(0)
    # without the buffer the order within each shard is the file order
    within = [c for c in captions_of(no_shuffle.train_stream()) if c.startswith("a train square 0-")]
    assert within == [f"a train square 0-{i}" for i in range(PER_SHARD)]


def test_unusable_samples_are_skipped_and_counted(shards, caplog):
    source = make_source(shards)
    stream = source.train_stream()
    with caplog.at_level(logging.WARNING, logger="text2img.data.webdataset"):
        captions = captions_of(stream)
    assert set(captions) == shards.train_captions and "a corrupt sample" not in captions
    decoder = next(stage for stage in stream.pipeline if type(stage).__name__ == "SampleDecoder")
    assert decoder.skipped == {"image does not decode": 1, "no caption": 1}
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and "2 skipped so far" in warnings[1]
    assert any("corrupt" in w and "does not decode" in w for w in warnings)


def test_splits_are_read_whole_resized_and_the_train_reference_is_fixed(shards):
    source = make_source(shards, reference_samples=5)
    val = source.split("val")
    assert len(val) == 8 and set(val.captions) == shards.val_captions
    image, caption = val[0]  # in file order: a 40 x 36 PNG of COLOURS[0]
    assert caption == "a val square 0-0" and image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert torch.allclose(image[:, 16, 16], torch.tensor(COLOURS[0]) / 127.5 - 1)
    reference = source.split("train", augmented=False)
    assert reference.captions == [f"a train square 0-{i}" for i in range(4)] + ["a train square 1-0"]
    assert source.identity == make_source(shards, reference_samples=5).identity
    assert source.identity != make_source(shards).identity


def test_config_composes_and_mistakes_are_one_line(shards, tmp_path):
    cfg = compose_train(tmp_path, data_overrides(shards))
    datamodule = build_data(cfg)
    assert isinstance(datamodule, WebDataModule) and isinstance(datamodule.source, WebDatasetSource)
    assert len(datamodule.source.urls["train"]) == SHARDS

    datamodule.num_workers = SHARDS + 1
    with pytest.raises(ConfigError, match=r"6 shards for 1 processes x 7 dataloader workers.*least 7 shards"):
        datamodule.train_dataloader()
    datamodule.num_workers = 0
    datamodule.trainer = SimpleNamespace(world_size=2, global_rank=1)  # as in DDP's second process
    with pytest.raises(ConfigError, match="needs data.epoch_samples"):
        datamodule.train_dataloader()
    datamodule.epoch_samples, datamodule.batch_size = 4, 2
    captions = [c for batch in datamodule.train_dataloader() for c in batch.captions]
    assert len(captions) == 2 and all(c.split()[-1][0] in "135" for c in captions), "rank 1: shards 1, 3, 5"
    with pytest.raises(FileNotFoundError, match=r"2 of 2 shards do not exist.*nowhere-00000.tar"):
        WebDatasetSource(str(shards.root / "nowhere-{00000..00001}.tar"), shards.val, shards.test, 32)
    with pytest.raises(ConfigError, match="cache_latents=false"):
        datamodule.cache_latents(None, "unused")


def test_epoch_samples_fixes_the_batches_per_epoch(shards, tmp_path):
    cfg = compose_train(tmp_path, data_overrides(shards, "data.num_workers=0", "data.batch_size=4",
                                                 "data.epoch_samples=12"))
    datamodule = build_data(cfg)
    loader = datamodule.train_dataloader()
    # 12 samples -> 3 batches of 4, in every epoch, though the shards hold 22 usable samples
    for _ in range(2):
        batches = list(loader)
        assert [len(batch) for batch in batches] == [4, 4, 4]
        assert batches[0].caption_draws is None  # no caption augmentation: nothing drawn


def test_smoke_training_streams_and_encodes_on_the_fly(shards, tmp_path):
    cfg = compose_train(tmp_path, data_overrides(
        shards, "data.num_workers=0", "trainer.max_steps=4",
        f"callbacks.evaluation.cache_dir={tmp_path / 'eval-cache'}"))
    run = build(cfg)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    # 22 usable samples, batches of 8: 2 per epoch, so the stream was read again (validation at step 3)
    assert run.trainer.global_step == 4 and run.trainer.current_epoch >= 1
    assert math.isfinite(float(run.trainer.callback_metrics["train/loss"]))
    assert math.isfinite(float(run.trainer.callback_metrics["val/fid_effnet"]))


def test_dataloader_workers_read_every_sample_once_per_epoch(shards, tmp_path):
    cfg = compose_train(tmp_path, data_overrides(shards, "data.num_workers=2", "data.batch_size=1"))
    datamodule = build_data(cfg)
    loader = datamodule.train_dataloader()
    epochs = [[caption for batch in loader for caption in batch.captions] for _ in range(2)]
    for captions in epochs:
        assert sorted(captions) == sorted(shards.train_captions)
    assert epochs[0] != epochs[1], "each epoch reshuffles"


@pytest.mark.slow
def test_ddp_cpu_two_processes_take_the_same_steps(shards, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "text2img.train", *data_overrides(shards), "trainer=ddp_cpu", "logger=csv",
         "data.num_workers=1", "data.epoch_samples=16",
         f"callbacks.evaluation.cache_dir={tmp_path / 'eval-cache'}", f"paths.log_dir={tmp_path}",
         f"hydra.run.dir={tmp_path}/run"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
