"""OmegaConf resolvers the configs use, registered once when `text2img` is imported.

- `${weights_dtype:precision[,mode]}`: the dtype frozen or trainable weights load in (text2img.utils.precision).
- `${launch_dir:}`: the folder the command was started from. Hydra's `${hydra:runtime.cwd}` is the same folder
  but only resolves inside a running job: the sweeper resolves `hydra.sweep.dir` (which derives from
  `paths.root_dir`) before any job exists, and a multirun failed on it. Jobs never change directory
  (`hydra.job.chdir: false`), so the current directory is the launch folder in every job too.
- `${hf_config:model,attribute,trust_remote_code,gguf_file}`: an attribute of a transformers model's text config
  (hub name or local folder), e.g. `encoder.hidden_size` of `encoder=hf`: the user names the model alone.
- `${text_features:hidden_size,layers,combine}`: the width of an encoder's token features (`encoder.features`), which
  the fusion head's `in_dim` follows: the hidden size, times the number of layers that `combine=concat` joins.
- `${diffusers_config:source,subfolder,name}`: one entry of a diffusers model's or scheduler's config (a folder or hub
  name), e.g. a pretrained UNet's cross_attention_dim, which generator.cond_dim then follows (adapt_pretrained).
- `${fused_optimizer:accelerator}`: the `fused` argument of the optimisers (conf/model/): true on a GPU, where torch's
  fused Adam/AdamW run as one kernel and drop a non-finite step on the device without a host sync
  (text2img.lightning.nonfinite); null (torch's default) on the CPU, whose figures it leaves as they were.
"""

from __future__ import annotations

import os

from typing import Any

from omegaconf import Container, OmegaConf

from text2img.utils.precision import weights_dtype
from text2img.utils.text_features import text_features


def launch_dir() -> str:
    return os.getcwd()


def hf_config(
    model: str, attribute: str, trust_remote_code: bool = False, gguf_file: str | None = None, *, _parent_: Container
) -> Any:
    # Imported here: transformers is slow to import, and only configs that name a hub model need it.
    from text2img.encoders.hf import pretrained_config

    key = _parent_._get_full_key("")  # the node holding `model`, for the message when it cannot be found
    return getattr(pretrained_config(model, trust_remote_code, gguf_file, key), attribute)


def fused_optimizer(accelerator: str) -> bool | None:
    if accelerator in ("gpu", "cuda"):
        return True
    if accelerator == "auto":
        import torch

        return True if torch.cuda.is_available() else None
    return None


def diffusers_config(source: str, subfolder: str | None, name: str) -> Any:
    # Imported here: diffusers is slow to import, and only configs that name a pretrained pipeline need it.
    from text2img.generators.pretrained import config_value

    return config_value(source, subfolder, name)


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("weights_dtype", weights_dtype, replace=True)
    OmegaConf.register_new_resolver("launch_dir", launch_dir, replace=True)
    OmegaConf.register_new_resolver("hf_config", hf_config, replace=True)
    OmegaConf.register_new_resolver("fused_optimizer", fused_optimizer, replace=True)
    OmegaConf.register_new_resolver("text_features", text_features, replace=True)
    OmegaConf.register_new_resolver("diffusers_config", diffusers_config, replace=True)
