"""Scale-out: DDP over processes and (simulated) nodes gives the single-process training, FSDP's wrapping policy,
the effective batch size, and precision (frozen weights in the low dtype, trainable ones float32)."""

import csv
import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from torch import Tensor, nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

from conftest import REPO_ROOT, compose_train, smoke_overrides
from text2img.callbacks.effective_batch import EffectiveBatch
from text2img.lightning.distributed import BlockWrapPolicy, _params_outside
from text2img.encoders import TinyEncoder
from text2img.errors import ConfigError
from text2img.fusion.base import FusionHead
from text2img.generators.diffusion import DiffusionGenerator
from text2img.utils.precision import weights_dtype
from text2img.run.compose import build_model
from text2img.types import TextEmbedding

TESTS_DIR = Path(__file__).resolve().parent


class KeyedNoiseDiffusion(DiffusionGenerator):
    """Pixel diffusion (epsilon prediction) whose training noise and timestep are drawn from a generator seeded by
    each image's bytes, not from the process's random stream: the loss of a batch is then the same however the
    batch is split over processes or accumulated batches, so runs with different splits must agree."""

    def training_loss(
        self, images: Tensor, text: TextEmbedding, fusion: FusionHead, latents: Tensor | None = None
    ) -> Tensor:
        x0 = self.to_model_space(images, latents)
        generators = [
            torch.Generator().manual_seed(int(hashlib.sha256(image.numpy().tobytes()).hexdigest()[:15], 16))
            for image in images
        ]
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in generators])
        steps = self.noise_scheduler.config.num_train_timesteps
        t = torch.cat([torch.randint(0, steps, (1,), generator=g) for g in generators])
        pred = self._denoise(self.noise_scheduler.add_noise(x0, noise, t), t, text, fusion)
        return torch.nn.functional.mse_loss(pred.float(), noise)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_command(imagefolder: Path, run_dir: Path, *overrides: str) -> list[str]:
    """A smoke run of a few seconds whose training noise does not depend on the process (`KeyedNoiseDiffusion`),
    with no caption dropout (drawn per process), without evaluation or test, and a learning rate high enough
    from the first step that the weights move far more than rounding."""
    return [
        *smoke_overrides(imagefolder), "logger=csv", "test=false", "model.caption_dropout=0",
        "model.optimizer.lr=1e-2", "model.lr_scheduler.num_warmup_steps=0",
        "generator._target_=test_distributed.KeyedNoiseDiffusion",
        "+trainer.limit_val_batches=0", "~callbacks.best_checkpoint", "~callbacks.evaluation", "~callbacks.sample_grid",
        f"paths.log_dir={run_dir.parent}", f"hydra.run.dir={run_dir}", *overrides,
    ]


def run_env() -> dict[str, str]:
    # this module importable by the training processes (KeyedNoiseDiffusion), one thread each on a shared machine
    return {**os.environ, "PYTHONPATH": str(TESTS_DIR), "OMP_NUM_THREADS": "1"}


def train(imagefolder: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-m", "text2img.train", *train_command(imagefolder, run_dir, *overrides)],
        capture_output=True, text=True, cwd=REPO_ROOT, env=run_env(), timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def loss_curve(run_dir: Path) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as file:
        return [float(row["train/loss"]) for row in csv.DictReader(file) if row.get("train/loss")]


def final_weights(run_dir: Path) -> dict[str, Tensor]:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert checkpoint["global_step"] == 6
    return checkpoint["state_dict"]


def assert_close_weights(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    """Within 2e-3: measured 2.3e-4 at most after 6 steps (Adam's normalised steps of 1e-2 amplify float32
    rounding in gradients near zero), against 6.5e-2 when the global batch differs (4 instead of 8)."""
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=0, atol=2e-3, msg=name)


@pytest.mark.slow
def test_two_processes_and_accumulation_train_as_one_process_with_the_global_batch(tmp_path, imagefolder):
    """One process with batch 8, two with 4 each, two with 2 each accumulating 2 batches: the same samples per
    step (the training loader's seeded permutation, which DDP splits between the processes) and the same mean
    gradient, so the same losses and weights up to float32 rounding: DDP averages two means of four where one
    process takes the mean of eight, in another order."""
    one = train(imagefolder, tmp_path / "one", "trainer=cpu", "data.batch_size=8")
    two = train(imagefolder, tmp_path / "two", "trainer=ddp_cpu", "data.batch_size=4")
    accumulated = train(imagefolder, tmp_path / "accumulated", "trainer=ddp_cpu", "data.batch_size=2",
                        "trainer.accumulate_grad_batches=2")
    assert "effective batch size 8 = 8 per process x 1 accumulated x 1 devices x 1 nodes" in one.stdout + one.stderr
    assert "effective batch size 8 = 4 per process x 1 accumulated x 2 devices x 1 nodes" in two.stdout + two.stderr
    assert "effective batch size 8 = 2 per process x 2 accumulated x 2 devices x 1 nodes" in (
        accumulated.stdout + accumulated.stderr
    )
    reference = loss_curve(tmp_path / "one")
    assert len(reference) == 6 and len(set(reference)) == 6
    # train/loss is logged with sync_dist: the mean over the processes, i.e. the global batch's loss. Measured:
    # 2e-6 relative at most; 3e-2 with a global batch of 4. (The accumulating run logs each batch's loss.)
    torch.testing.assert_close(torch.tensor(loss_curve(tmp_path / "two")), torch.tensor(reference), rtol=1e-4, atol=0)
    assert_close_weights(final_weights(tmp_path / "two"), final_weights(tmp_path / "one"))
    assert_close_weights(final_weights(tmp_path / "accumulated"), final_weights(tmp_path / "one"))


@pytest.mark.slow
def test_two_nodes_under_torchrun(tmp_path, imagefolder):
    """torchrun on two "nodes" of one process each (both on localhost): one world of two processes."""
    port = free_port()
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={rank}",
             "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "text2img.train",
             *train_command(imagefolder, tmp_path / f"node{rank}", "trainer=ddp_cpu", "trainer.devices=1",
                            "trainer.num_nodes=2", "data.batch_size=4")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT, env=run_env(),
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-3000:]
    assert "effective batch size 8 = 4 per process x 1 accumulated x 1 devices x 2 nodes" in outputs[0]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]
    assert len(loss_curve(tmp_path / "node0")) == 6
    assert torch.load(tmp_path / "node0" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


def test_effective_batch_size():
    batch = EffectiveBatch(per_process=8, accumulated=4, devices=4, nodes=2)
    assert batch.size == 256
    assert str(batch) == "effective batch size 256 = 8 per process x 4 accumulated x 4 devices x 2 nodes"


def tiny_llama() -> LlamaModel:
    return LlamaModel(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                                  num_key_value_heads=1, vocab_size=50))


def tiny_bert() -> BertModel:
    return BertModel(BertConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                vocab_size=50))


def class_counts(modules: list[nn.Module]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for module in modules:
        counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    return counts


def assert_one_dtype_per_unit(root: nn.Module, units: list[nn.Module]) -> None:
    """FSDP flattens the parameters each unit holds (outside its nested units) into one tensor: one dtype."""
    for unit in [root, *units]:
        dtypes = {parameter.dtype for parameter in _params_outside(unit, set(units))}
        assert len(dtypes) <= 1, f"{type(unit).__name__} holds {dtypes}"


def test_fsdp_config_composes_and_its_policy_wraps_the_blocks(tmp_path, imagefolder, tiny_first_stage):
    cfg = compose_train(tmp_path, [*smoke_overrides(imagefolder), "trainer=fsdp", "generator=ldm",
                                   f"generator.first_stage.source={tiny_first_stage}", "peft=lora"])
    assert (cfg.trainer.accelerator, cfg.trainer.precision) == ("gpu", "bf16-mixed")
    strategy = instantiate(cfg.trainer.strategy)  # FSDP itself needs a GPU; its settings build here
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, BlockWrapPolicy) and strategy.kwargs["use_orig_params"]

    _, model = build_model(cfg)  # bf16-mixed: a bfloat16 first stage and LLM base with float32 LoRA adapters
    units = policy.units(model)
    assert class_counts(units) == {
        "ResnetBlock2D": 21, "BasicTransformerBlock": 4, "CrossAttnUpBlock2D": 1, "UpBlock2D": 1,  # UNet + first stage
        "GPT2Block": 2,  # the tiny encoder's layers
        "ModuleDict": 8,  # float32 LoRA adapters (lora_A, lora_B of 2 layers x 2 projections) on the bfloat16 layers
        "TinyEncoder": 1, "FirstStage": 1,  # bfloat16 parts outside any block, in a float32 model
    }
    assert_one_dtype_per_unit(model, units)
    assert policy._run_policy(model, {units[0]}, {"device_id": None}) == {u: {"device_id": None} for u in units[1:]}
    # the blocks alone, e.g. for activation checkpointing
    assert "FirstStage" not in class_counts(BlockWrapPolicy(split_dtypes=False).units(model))


@pytest.mark.parametrize("build, block", [(tiny_llama, "LlamaDecoderLayer"), (tiny_bert, "BertLayer")])
def test_policy_finds_the_layers_of_any_transformers_model(build, block):
    model = build()
    counts = class_counts(BlockWrapPolicy().units(nn.ModuleDict({"llm": model, "head": nn.Linear(16, 4)})))
    assert counts[block] == model.config.num_hidden_layers
    model._no_split_modules = None  # a model that names no blocks: its stack of num_hidden_layers layers
    assert class_counts(BlockWrapPolicy().units(model)) == {block: model.config.num_hidden_layers}


def test_activation_checkpointing_with_the_policy_keeps_gradients(tmp_path):
    """The policy is what torch's apply_activation_checkpointing walks (as FSDPStrategy does after wrapping)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointWrapper,
        apply_activation_checkpointing,
    )

    torch.manual_seed(0)
    model, ids = tiny_llama(), torch.randint(0, 50, (2, 5))
    model.train()
    model(ids).last_hidden_state.square().sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    apply_activation_checkpointing(model, auto_wrap_policy=BlockWrapPolicy(split_dtypes=False))
    assert sum(isinstance(m, CheckpointWrapper) for m in model.modules()) == 3
    model(ids).last_hidden_state.square().sum().backward()
    for grad, want in zip([p.grad for p in model.parameters()], expected):
        torch.testing.assert_close(grad, want)


@pytest.mark.parametrize("precision, mode, dtype", [
    ("32-true", "frozen", "float32"), ("bf16-mixed", "frozen", "bfloat16"), ("bf16-mixed", "lora", "bfloat16"),
    ("bf16-mixed", "full", "float32"), ("16-mixed", "frozen", "float16"), (32, "frozen", "float32"),
])
def test_weights_dtype_follows_the_precision(precision, mode, dtype):
    assert weights_dtype(precision, mode) == dtype


def test_unknown_precision_names_the_choices():
    with pytest.raises(ConfigError, match="trainer.precision=fp8 has no known weights dtype; use one of 32-true"):
        weights_dtype("fp8")


def test_bf16_mixed_loads_frozen_weights_in_bfloat16_and_trains_float32(tmp_path, imagefolder, tiny_first_stage):
    overrides = [*smoke_overrides(imagefolder), "trainer.precision=bf16-mixed", "generator=ldm",
                 f"generator.first_stage.source={tiny_first_stage}"]
    cfg = compose_train(tmp_path, overrides)
    assert (cfg.encoder.dtype, cfg.generator.first_stage.dtype) == ("bfloat16", "bfloat16")
    encoder = instantiate(cfg.encoder)
    encoder.load()
    assert {p.dtype for p in encoder.parameters()} == {torch.bfloat16}

    datamodule, model = build_model(compose_train(tmp_path, [*overrides, "peft=lora"]))
    first_stage = model.generator.first_stage
    assert {p.dtype for p in first_stage.parameters()} == {torch.bfloat16}
    trainable = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    assert any(".lora_" in name for name in trainable) and set(trainable.values()) == {torch.float32}
    assert {p.dtype for p in model.conditioner.encoder.parameters() if not p.requires_grad} == {torch.bfloat16}
    # the bfloat16 first stage takes float32 images and returns float32, outside autocast too
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    assert first_stage.moments(images).dtype == torch.float32
    assert first_stage.decode(first_stage.moments(images)[:, :4]).dtype == torch.float32

    full = compose_train(tmp_path, [*overrides, "encoder.mode=full"])
    assert full.encoder.dtype == "float32"
    with pytest.raises(ConfigError, match="encoder.mode=full trains every weight, which needs float32"):
        TinyEncoder(mode="full", dtype="bfloat16")


def test_latent_cache_keys_differ_by_first_stage_dtype(tmp_path, imagefolder, tiny_first_stage):
    from text2img.generators.first_stage import load_first_stage
    from text2img.generators.latent_cache import LatentCache

    cfg = compose_train(tmp_path, smoke_overrides(imagefolder))
    source = instantiate(cfg.data.source)
    paths = {LatentCache(tmp_path, load_first_stage(str(tiny_first_stage), dtype=d)).path(source)
             for d in ("float32", "bfloat16")}
    assert len(paths) == 2
