"""OmegaConf resolvers the configs use, registered once when `text2img` is imported.

- `${weights_dtype:precision[,mode]}`: the dtype frozen or trainable weights load in (text2img.precision).
- `${launch_dir:}`: the folder the command was started from. Hydra's `${hydra:runtime.cwd}` is the same folder
  but only resolves inside a running job: the sweeper resolves `hydra.sweep.dir` (which derives from
  `paths.root_dir`) before any job exists, and a multirun failed on it. Jobs never change directory
  (`hydra.job.chdir: false`), so the current directory is the launch folder in every job too.
"""

from __future__ import annotations

import os

from omegaconf import OmegaConf

from text2img.precision import weights_dtype


def launch_dir() -> str:
    return os.getcwd()


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("weights_dtype", weights_dtype, replace=True)
    OmegaConf.register_new_resolver("launch_dir", launch_dir, replace=True)
