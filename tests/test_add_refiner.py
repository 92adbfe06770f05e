"""experiments/default_model/add_refiner.py: a checkpoint trained without the patch code's refiner, given one
afterwards, is the checkpoint that the same run with the refiner writes."""

import sys

import pytest
import torch
from conftest import REPO_ROOT, compose_train, smoke_overrides, write_imagefolder

from text2img.run.compose import load_model
from text2img.train import train

sys.path.insert(0, str(REPO_ROOT / "experiments" / "default_model"))
import add_refiner  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REFINER = {"refiner_width": 8, "refiner_steps": 4, "refiner_noise": 1.0}


def test_a_refiner_added_afterwards_gives_the_checkpoint_of_a_run_trained_with_it(tmp_path, monkeypatch):
    data = write_imagefolder(tmp_path / "data")
    common = ["generator=ldm", "generator/first_stage=patch_pca", "generator.cache_latents=true", "logger=csv",
              "test=false", "callbacks.sample_grid=null"]
    with_refiner = [f"generator.first_stage.{name}={value}" for name, value in REFINER.items()]
    for name, extra in (("plain", []), ("refined", with_refiner)):
        train(compose_train(tmp_path / name, smoke_overrides(data, *common, *extra)))

    added = tmp_path / "added.ckpt"
    arguments = [str(tmp_path / "plain" / "checkpoints" / "last.ckpt"), str(added), "--width", "8", "--steps", "4"]
    monkeypatch.setattr(sys, "argv", ["add_refiner.py", *arguments])
    add_refiner.main()

    checkpoint, _, model = load_model(str(added))
    _, _, expected = load_model(str(tmp_path / "refined" / "checkpoints" / "last.ckpt"))
    assert checkpoint["text2img_config"]["generator"]["first_stage"].items() >= REFINER.items()
    assert model.generator.first_stage.autoencoder.refiner_trained
    # every weight equal: the denoiser trained the same with and without the refiner, and the refiner is the same
    state, reference = model.state_dict(), expected.state_dict()
    assert state.keys() == reference.keys()
    for name, value in reference.items():
        assert torch.equal(state[name], value), name
    assert sorted(path.name for path in tmp_path.glob("*.ckpt")) == ["added.ckpt"]  # no temporary file left
    assert not list(tmp_path.glob(".*.tmp"))


def test_it_refuses_a_checkpoint_without_a_patch_code(tmp_path, monkeypatch):
    data = write_imagefolder(tmp_path / "data")
    train(compose_train(tmp_path / "run", smoke_overrides(data, "logger=csv", "test=false", "callbacks.sample_grid=null")))
    monkeypatch.setattr(sys, "argv", ["add_refiner.py", str(tmp_path / "run" / "checkpoints" / "last.ckpt"),
                                      str(tmp_path / "out.ckpt")])
    with pytest.raises(SystemExit, match="is not latent diffusion on a patch code"):
        add_refiner.main()
