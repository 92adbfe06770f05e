"""Evaluation metrics as a Lightning callback: the same figures in validation, test and `text2img.evaluate`."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L

from text2img.metrics.base import EvalBatch, EvalContext, EvalMetric
from text2img.networks.features import RealFeatureCache
from text2img.types import EvalOutputs
from text2img.utils.rng import random_state_kept

# Trainer entry point -> the evaluation stages it runs.
STAGES = {"fit": ("val",), "validate": ("val",), "test": ("test",)}


class Evaluation(L.Callback):
    """Feeds every validation/test batch to the configured metrics and logs `<stage>/<figure>`
    (e.g. `val/fid_effnet`) to every logger at the end of the epoch.

    Each stage gets its own copy of the metrics, prepared in `setup` (before the fit timer starts):
    reference statistics and evaluators are loaded from `cache_dir`, or computed once and cached
    there. Image features are computed once per batch and shared by the metrics using the same network.
    """

    def __init__(self, metrics: dict[str, EvalMetric | None], cache_dir: str) -> None:
        super().__init__()
        self.prototypes = {name: metric for name, metric in metrics.items() if metric is not None}
        self.cache_dir = Path(cache_dir).expanduser()
        self.stage_metrics: dict[str, dict[str, EvalMetric]] = {}
        # The figures of the last completed epoch of each stage, for reports and `text2img.evaluate`.
        self.results: dict[str, dict[str, float]] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for eval_stage in STAGES.get(stage, ()):
            if eval_stage not in self.stage_metrics:
                self.stage_metrics[eval_stage] = self._prepared_metrics(trainer, pl_module, eval_stage)

    def _prepared_metrics(
        self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str
    ) -> dict[str, EvalMetric]:
        datamodule = trainer.datamodule
        if not datamodule.evaluated(stage):  # a split too small to evaluate (the data module warned)
            return {}
        split = datamodule.eval_split(stage)
        conditioner = pl_module.conditioner
        # the frozen text side, also when the encoder trains
        prompts = conditioner.reference(datamodule.captions(split))
        context = EvalContext(
            source=datamodule.source,
            split=split,
            encoder=conditioner.reference_encoder,
            embeddings=conditioner.cache,
            features=RealFeatureCache(self.cache_dir / "features"),
            cache_dir=self.cache_dir,
            prompts=prompts.captions,
            prompt_text=prompts.text,
            device=trainer.strategy.root_device,
        )
        metrics = {name: copy.deepcopy(metric) for name, metric in self.prototypes.items()}
        # Building a cache (an extractor's random init, an evaluator's training) must not move the run's random stream.
        with random_state_kept(context.device):
            for metric in metrics.values():
                metric.prepare(context)
        return metrics

    def _update(self, stage: str, pl_module: L.LightningModule, outputs: EvalOutputs) -> None:
        batch = EvalBatch(outputs)
        for metric in self.stage_metrics[stage].values():
            metric.to(pl_module.device).update(batch)

    def _log(self, stage: str, pl_module: L.LightningModule) -> None:
        figures: dict[str, float] = {}
        for metric in self.stage_metrics[stage].values():
            if metric.update_count:
                figures.update({name: float(value) for name, value in metric.compute().items()})
            metric.reset()
        for name, value in figures.items():
            pl_module.log(f"{stage}/{name}", value)
        self.results[stage] = figures

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._update("val", pl_module, outputs)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._log("val", pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update("test", pl_module, outputs)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._log("test", pl_module)
