"""Every invalid value a user can type into `text2img.train` is one line naming the key as typed and the fix,
reported before anything heavy starts (text2img.run.config_checks); `encoder=hf` reads its sizes from the model."""

from pathlib import Path

import pytest
import torch

from conftest import compose_train, smoke_overrides
from text2img.run.config_checks import check_config
from text2img.errors import root_cause
from text2img.run.compose import USER_ERRORS, build


def config_error(tmp_path: Path, overrides: list[str]) -> str:
    """The one-line message `check_config` gives for a composed train config."""
    cfg = compose_train(tmp_path, overrides)
    with pytest.raises(Exception) as exc:
        check_config(cfg)
    error = root_cause(exc.value)  # the encoder's own checks come through Hydra's instantiate
    assert isinstance(error, USER_ERRORS), repr(error)  # what text2img.train reports as one line
    assert "\n" not in str(error), str(error)
    return str(error)


def write_model_folder(folder: Path, layers: int = 2, width: int = 48) -> Path:
    """A tiny GPT-2 and the tiny encoder's byte tokenizer, saved as `encoder=hf` finds a model on disk."""
    from transformers import GPT2Config, GPT2Model

    from text2img.encoders.tiny import BOS, EOS, PAD, VOCAB_SIZE, byte_tokenizer

    torch.manual_seed(0)  # the embedding cache keys a folder by its name: keep the weights behind a name the same
    GPT2Model(GPT2Config(n_layer=layers, n_embd=width, n_head=2, n_positions=128, vocab_size=VOCAB_SIZE,
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def truncated_checkpoint(tmp_path: Path) -> Path:
    whole = tmp_path / "whole.ckpt"
    torch.save({"text2img_config": {}, "state_dict": {"w": torch.zeros(1000)}}, whole)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return cut


SMOKE = ["debug=smoke"]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        # one per rule family: steps, sizes, types, counts, rates, intervals, durations, choices, flags
        (["trainer.max_steps=-3"],
         "trainer.max_steps=-3 is invalid; set trainer.max_steps to an integer >= 1, or -1 (no limit)"),
        (["data.batch_size=0"], "data.batch_size=0 is invalid; set data.batch_size to an integer >= 1"),
        (["data.batch_size=abc"], "data.batch_size='abc' is invalid; set data.batch_size to an integer >= 1"),
        (["data.num_workers=-1"], "data.num_workers=-1 is invalid; set data.num_workers to an integer >= 0"),
        (["model.optimizer.lr=0"], "model.optimizer.lr=0 is invalid; set model.optimizer.lr to a number > 0"),
        (["model.caption_dropout=1.0"],
         "model.caption_dropout=1.0 is invalid; set model.caption_dropout to a number in [0, 1)"),
        (["callbacks.ema.decay=1.5"], "callbacks.ema.decay=1.5 is invalid; set callbacks.ema.decay to a number in [0, 1)"),
        (["trainer.val_check_interval=0"], "trainer.val_check_interval=0 is invalid; set trainer.val_check_interval to "
                                           "an integer >= 1, or a fraction of an epoch in (0, 1]"),
        (["trainer.max_time=8h"], "trainer.max_time='8h' is invalid; set trainer.max_time to a duration DD:HH:MM:SS"),
        (["generator.sample_steps=0"], "generator.sample_steps=0 is invalid"),
        (["generator.guidance_scale=0.5"], "generator.guidance_scale=0.5 is invalid; set generator.guidance_scale to "
                                           "a number >= 1 (1: no guidance)"),
        (["fusion=perceiver", "fusion.num_latents=0"], "fusion.num_latents=0 is invalid"),
        (["test=maybe"], "test='maybe' is invalid; set test to true or false"),
        (["peft=lora", "encoder.lora.rank=0"], "encoder.lora.rank=0 is invalid"),
        # checks of several keys, of files, of the model's config
        (["data.source.val_fraction=0.5", "data.source.test_fraction=0.5"],
         "data.source.val_fraction + data.source.test_fraction = 1.0 leaves nothing to train on"),
        (["data=imagefolder", "data.source.path=/no/such/folder"],
         "data.source.path='/no/such/folder' does not exist; give the folder holding your images"),
        (["fusion=perceiver", "fusion.heads=5"], "fusion.heads=5 does not divide fusion.out_dim=32"),
        (["encoder.layer=10"], "encoder.layer=10 is out of range for tiny-gpt2-64d-seed0, which has 2 layers"),
        (["model.init_from=/no/such.ckpt"], "model.init_from='/no/such.ckpt' does not exist; pass a .ckpt"),
        # values left unset, interpolations that do not resolve, a resolver's own error
        (["data=webdataset"], "data.source.train_shards, data.source.val_shards, data.source.test_shards have no "
                              "value; set them on the command line, e.g. data.source.train_shards=<value>"),
        (["encoder=hf"], "encoder.model has no value; set it on the command line, e.g. encoder.model=<value>"),
        (["fusion.in_dim=${encoder.hiden_size}"], "fusion.in_dim cannot be resolved: Interpolation key "
                                                  "'encoder.hiden_size' not found"),
        (["trainer.precision=77"], "trainer.precision=77 has no known weights dtype"),
    ],
)
def test_bad_value_is_one_line_naming_the_key(tmp_path, overrides, expected):
    assert config_error(tmp_path, [*SMOKE, *overrides]).startswith(expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is there")
def test_gpu_trainer_without_a_gpu(tmp_path):
    assert config_error(tmp_path, [*SMOKE, "trainer=gpu"]) == (
        "trainer.accelerator=gpu but this machine has no GPU torch can use; use trainer=cpu"
    )


def test_checkpoints_that_cannot_resume(tmp_path):
    message = config_error(tmp_path, [*SMOKE, f"ckpt_path={truncated_checkpoint(tmp_path)}"])
    assert message.startswith(f"ckpt_path='{tmp_path / 'cut.ckpt'}' is not a text2img checkpoint (unreadable")
    assert config_error(tmp_path, [*SMOKE, f"ckpt_path={tmp_path / 'none.ckpt'}"]).startswith(
        f"ckpt_path='{tmp_path / 'none.ckpt'}' does not exist"
    )
    check_config(compose_train(tmp_path, [*SMOKE, "ckpt_path=last"]))  # Lightning finds it (or starts fresh)


@pytest.mark.parametrize(
    "overrides",
    [[], SMOKE, ["experiment=openmoji_ldm"], ["experiment=openmoji_gan"], ["experiment=openmoji_vae"],
     [*SMOKE, "data=shapes"], [*SMOKE, "fusion=perceiver"], [*SMOKE, "fusion=timestep_aware"],
     [*SMOKE, "generator=gan", "fusion=film"], [*SMOKE, "fusion=pooled_mlp", "generator=vae"],
     [*SMOKE, "peft=lora", "generator_peft=lora"], [*SMOKE, "trainer=ddp_cpu", "callbacks=none"],
     [*SMOKE, "trainer.val_check_interval=0.5", "trainer.max_steps=-1", "trainer.devices=auto"]],
    ids=lambda overrides: " ".join(overrides) or "default",
)
def test_shipped_configs_pass(tmp_path, overrides):
    check_config(compose_train(tmp_path, overrides))


def test_hf_encoder_reads_its_sizes_from_the_model(tmp_path, imagefolder):
    model = write_model_folder(tmp_path / "tiny-gpt2")
    hf = ["encoder=hf", f"encoder.model={model}", f"paths.cache_dir={tmp_path / 'cache'}"]
    cfg = compose_train(tmp_path / "run", smoke_overrides(imagefolder, *hf, "trainer.fast_dev_run=true"))
    assert cfg.encoder.hidden_size == cfg.fusion.in_dim == cfg.model.text_dim == 48
    check_config(cfg)
    run = build(cfg)
    run.trainer.fit(run.model, datamodule=run.datamodule)
    assert run.trainer.global_step == 1
    # an explicit hidden size still wins, and is checked against the model before it loads
    explicit = compose_train(tmp_path, [*SMOKE, *hf, "encoder.hidden_size=64"])
    assert explicit.fusion.in_dim == 64
    assert config_error(tmp_path, [*SMOKE, *hf, "encoder.hidden_size=64"]).startswith(
        "encoder.hidden_size=64 but tiny-gpt2 has hidden size 48; set encoder.hidden_size=48"
    )
    # the layer count comes from the model's config too
    assert config_error(tmp_path, [*SMOKE, *hf, "encoder.layer=3"]).startswith(
        "encoder.layer=3 is out of range for tiny-gpt2, which has 2 layers"
    )
    (tmp_path / "empty").mkdir()
    assert config_error(tmp_path, [*SMOKE, "encoder=hf", f"encoder.model={tmp_path / 'empty'}"]).startswith(
        f"encoder.model='{tmp_path / 'empty'}' is a folder without a model's config.json"
    )


@pytest.mark.parametrize(
    ("key", "args", "says"),
    [
        # with experiment=openmoji_ldm a first stage would train first
        ("trainer.max_steps=-3", ["trainer.max_steps=-3", "experiment=openmoji_ldm"], "or -1 (no limit)"),
        ("encoder.model='", ["encoder=hf", "encoder.model={tmp}/no-model"],
         "no such folder, and not reachable on the hub in offline mode (HF_HUB_OFFLINE=1)"),
        ("ckpt_path='", ["ckpt_path={truncated}"], "is not a text2img checkpoint (unreadable"),
    ],
)
def test_command_line_errors_are_one_line_before_anything_starts(tmp_path, entry_point, key, args, says):
    """Values a new user typed, through the real command line (argument checks, Hydra, error reporting)."""
    args = [arg.format(tmp=tmp_path, truncated=truncated_checkpoint(tmp_path) if "{truncated}" in arg else "")
            for arg in args]
    folder = tmp_path / "run"
    out = entry_point("train", *args, *SMOKE, f"hydra.run.dir={folder}", f"paths.cache_dir={tmp_path / 'cache'}")
    assert out.returncode == 1, out.stderr
    last_line = out.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"text2img: error: {key}") and says in last_line, out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    # nothing started: the seed is set right after the checks, a first stage or a fit would write here
    assert "Seed set" not in out.stdout + out.stderr
    assert not (folder / "checkpoints").exists() and not (tmp_path / "cache" / "first_stages").exists()
