"""Layer 1: the statistics as pure functions on tensors (no Lightning import).

Every estimator comes as an *update* that turns gradient moments into sufficient statistics and a
*compute* that turns those into the number, in the torchmetrics functional style, plus small
running trackers (bias-corrected EMAs) with ``state_dict`` / ``load_state_dict``.

Each name loads its module when first used, so importing this package is free until then.
"""

from lightning_gradnoise._lazy import lazy_names

_WHERE = {
    "EMAMoments": "_interval",
    "fieller_interval": "_interval",
    "t_quantile": "_interval",
    "batch_range_for_gr_s": "_bands",
    "BiasCorrectedEMA": "_ema",
    "check_band": "_bands",
    "divided_power": "_redundancy",
    "ema_effective_steps": "_redundancy",
    "gr_s": "_redundancy",
    "GR_S_BAND": "_bands",
    "gr_s_groups": "_redundancy",
    "gr_t_expected": "_redundancy",
    "gr_t_frozen": "_redundancy",
    "GR_T_TARGET": "_bands",
    "GradientNoiseScale": "_noise_scale",
    "gsnr": "_gsnr",
    "LossTrend": "_step_ratio",
    "gsnr_layer_stats": "_gsnr",
    "gsnr_moments": "_gsnr_stat",
    "GSNRStatistic": "_gsnr_stat",
    "gsnr_scale": "_gsnr",
    "gsnr_scale_many": "_gsnr",
    "gsnr_variance": "_gsnr",
    "SMALL_K": "_gsnr",
    "mu_from_gr_s_groups": "_redundancy",
    "noise_scale_compute": "_noise_scale",
    "noise_scale_from_moments": "_noise_scale",
    "noise_scale_update": "_noise_scale",
    "noise_scale_update_from_sums": "_noise_scale",
    "NoiseScaleStats": "_noise_scale",
    "TemporalRedundancy": "_redundancy",
    "ratio_interval": "_step_ratio",
    "StepSizeRatio": "_step_ratio",
}

__all__ = sorted(_WHERE)

__getattr__, __dir__ = lazy_names(__name__, _WHERE)
