from text2img.callbacks.adapter_checkpoint import AdapterCheckpoint
from text2img.callbacks.best_checkpoint import BestCheckpoint
from text2img.callbacks.effective_batch import EffectiveBatchSize
from text2img.callbacks.ema import EMA
from text2img.callbacks.evaluation import Evaluation
from text2img.callbacks.last_checkpoint import LastCheckpoint
from text2img.callbacks.progress_bar import LoggedProgressBar, progress_bar
from text2img.callbacks.rng_state import RNGState
from text2img.callbacks.sample_grid import SampleGridCallback

__all__ = [
    "AdapterCheckpoint", "BestCheckpoint", "EffectiveBatchSize", "EMA", "Evaluation", "LastCheckpoint",
    "LoggedProgressBar", "RNGState", "SampleGridCallback", "progress_bar",
]
