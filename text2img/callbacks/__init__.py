from text2img.callbacks.adapter_checkpoint import AdapterCheckpoint
from text2img.callbacks.ema import EMA
from text2img.callbacks.evaluation import Evaluation
from text2img.callbacks.sample_grid import SampleGridCallback

__all__ = ["AdapterCheckpoint", "EMA", "Evaluation", "SampleGridCallback"]
