"""Layer 1: the statistics as pure functions on tensors (no Lightning import).

Every estimator comes as an *update* that turns gradient moments into sufficient statistics and a
*compute* that turns those into the number, in the torchmetrics functional style, plus small
running trackers (bias-corrected EMAs) with ``state_dict`` / ``load_state_dict``.
"""

from lightning_gradnoise.stats._ema import BiasCorrectedEMA
from lightning_gradnoise.stats._gsnr import gsnr, gsnr_layer_stats, gsnr_scale, gsnr_scale_many, gsnr_variance
from lightning_gradnoise.stats._noise_scale import (
    GradientNoiseScale,
    NoiseScaleStats,
    noise_scale_compute,
    noise_scale_from_moments,
    noise_scale_update,
    noise_scale_update_from_sums,
)
from lightning_gradnoise.stats._redundancy import (
    GR_S_BAND,
    GR_T_TARGET,
    TemporalRedundancy,
    batch_range_for_gr_s,
    check_band,
    divided_power,
    gr_s,
    gr_s_groups,
    gr_t_expected,
    ema_effective_steps,
    gr_t_frozen,
    mu_from_gr_s_groups,
)

__all__ = [
    "BiasCorrectedEMA",
    "GR_S_BAND",
    "GR_T_TARGET",
    "GradientNoiseScale",
    "NoiseScaleStats",
    "TemporalRedundancy",
    "batch_range_for_gr_s",
    "check_band",
    "divided_power",
    "gr_s",
    "gr_s_groups",
    "gr_t_expected",
    "ema_effective_steps",
    "gr_t_frozen",
    "gsnr",
    "gsnr_layer_stats",
    "gsnr_scale",
    "gsnr_scale_many",
    "gsnr_variance",
    "mu_from_gr_s_groups",
    "noise_scale_compute",
    "noise_scale_from_moments",
    "noise_scale_update",
    "noise_scale_update_from_sums",
]
