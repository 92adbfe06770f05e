from text2img.callbacks.ema import EMA
from text2img.callbacks.fid import FIDCallback
from text2img.callbacks.sample_grid import SampleGridCallback

__all__ = ["EMA", "FIDCallback", "SampleGridCallback"]
