from text2img.metrics.effnet import EfficientNetLite0Features
from text2img.metrics.fid import build_fid, metric_name

__all__ = ["EfficientNetLite0Features", "build_fid", "metric_name"]
