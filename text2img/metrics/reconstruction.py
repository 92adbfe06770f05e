"""PSNR and SSIM of reconstructions, for backends that reconstruct their input (VAEs)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from text2img.metrics.base import EvalBatch, EvalMetric


class ReconstructionQuality(EvalMetric):
    """Mean per-image `psnr` (dB) and `ssim` of reconstructions against their real images, in [0, 1] range.

    Per-image values are summed (streaming, DDP-exact) and averaged at the end, as papers report
    them. Reports nothing for generators that do not reconstruct.
    """

    FIGURES = ("psnr", "ssim")

    def __init__(self) -> None:
        super().__init__()
        self.add_state("psnr_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("ssim_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, batch: EvalBatch) -> None:
        reconstructions = batch.outputs.reconstructions
        if reconstructions is None:
            return
        real = batch.outputs.real.to(reconstructions)
        psnr = peak_signal_noise_ratio(reconstructions, real, data_range=1.0, reduction="none", dim=(1, 2, 3))
        ssim = structural_similarity_index_measure(reconstructions, real, data_range=1.0, reduction="none")
        self.psnr_sum += psnr.double().sum()
        self.ssim_sum += ssim.double().sum()
        self.count += len(real)

    def compute(self) -> dict[str, Tensor]:
        if self.count == 0:
            return {}
        return {"psnr": (self.psnr_sum / self.count).float(), "ssim": (self.ssim_sum / self.count).float()}
