"""Every public constructor and function checks its arguments: a bad value is a ``TypeError`` (wrong
type) or ``ValueError`` (wrong value) whose message names the argument.

The test walks the ``__all__`` of the package and of each public sub-package: a public name must
have a case here or be listed in ``EXEMPT`` with the reason, so a new public name without checks
fails this test. Each case gives a call that works and, per argument, values that must be refused.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
from torch import nn

MODULES = ["lightning_gradnoise", "lightning_gradnoise.stats", "lightning_gradnoise.scaling", "lightning_gradnoise.control",
           "lightning_gradnoise.capture", "lightning_gradnoise.optim", "lightning_gradnoise.nqm",
           "lightning_gradnoise.callbacks", "lightning_gradnoise.strategies"]

nan, inf = math.nan, math.inf
POSITIVE = ["1.0", None, nan, inf, -inf, 0.0, -1.0]           # a finite number > 0
NON_NEGATIVE = ["1.0", None, nan, inf, -1.0]                  # a finite number >= 0
OPEN_UNIT = ["0.9", None, nan, inf, 0.0, 1.0, -0.1, 1.5]      # 0 < x < 1
HALF_OPEN_UNIT = ["0.9", None, nan, inf, 1.0, -0.1, 1.5]      # 0 <= x < 1
ABOVE_ONE = ["2.0", None, nan, inf, 1.0, 0.5, -1.0]           # 1 < x < inf
LR = ["0.1", None, nan, inf, -1.0]                             # a finite number >= 0
POSITIVE_INT = ["4", None, True, 2.5, nan, 0, -3]             # a whole number >= 1
NON_NEGATIVE_INT = ["4", None, True, 2.5, nan, -1]            # a whole number >= 0
TWO_OR_MORE = ["2", None, True, 2.5, 1, 0, -2]                # a whole number >= 2 (groups)
BOOL = ["no", 1, None]
BANDS = [(0.65, 0.5), (0.0, 0.5), (0.5, 1.0), (0.5,), (0.5, 0.6, 0.7), "ab", (nan, 0.5), None]


def params() -> list[nn.Parameter]:
    return list(nn.Linear(3, 2).parameters())


def named() -> list[tuple[str, nn.Parameter]]:
    return list(nn.Linear(3, 2).named_parameters())


@dataclass
class Case:
    call: Callable[..., Any]
    valid: dict[str, Any]
    bad: dict[str, list[Any]] = field(default_factory=dict)


def _stats(name):
    return getattr(importlib.import_module("lightning_gradnoise.stats"), name)


def _mod(module, name):
    return getattr(importlib.import_module(f"lightning_gradnoise.{module}"), name)


def _probe_after_a_step():
    lin = nn.Linear(3, 2)
    probe = _mod("capture", "StepProbe")(lin)
    lin(torch.ones(1, 3)).sum().backward()
    probe.before_step()
    return probe


def _method(cls_factory, method):
    return lambda **kw: getattr(cls_factory(), method)(**kw)


T = torch.tensor
CASES: dict[str, Case] = {
    # -- stats -----------------------------------------------------------------------------------
    "BiasCorrectedEMA": Case(lambda **kw: _stats("BiasCorrectedEMA")(**kw), {"decay": 0.9}, {"decay": HALF_OPEN_UNIT}),
    "GradientNoiseScale": Case(lambda **kw: _stats("GradientNoiseScale")(**kw), {"decay": 0.9}, {"decay": HALF_OPEN_UNIT}),
    "TemporalRedundancy": Case(lambda **kw: _stats("TemporalRedundancy")(**kw), {"beta": 0.9}, {"beta": OPEN_UNIT}),
    "batch_range_for_gr_s": Case(lambda **kw: _stats("batch_range_for_gr_s")(**kw), {"b_simple": 100.0, "band": (0.5, 0.65)},
                                 {"b_simple": POSITIVE, "band": BANDS}),
    "check_band": Case(lambda **kw: _stats("check_band")(**kw), {"band": (0.5, 0.65)}, {"band": BANDS}),
    "divided_power": Case(lambda **kw: _stats("divided_power")(**kw), {"a": T(0.5), "b": T(0.4), "p": 3.0, "tol": 1e-7},
                          {"a": ["x", None], "b": ["x", None], "p": ["3", None, nan], "tol": POSITIVE}),
    "ema_effective_steps": Case(lambda **kw: _stats("ema_effective_steps")(**kw), {"beta": 0.9, "steps": 10},
                                {"beta": OPEN_UNIT, "steps": POSITIVE_INT[:1] + POSITIVE_INT[2:]}),
    "gr_s": Case(lambda **kw: _stats("gr_s")(**kw), {"b_simple": 100.0, "batch_size": 64.0},
                 {"b_simple": NON_NEGATIVE, "batch_size": POSITIVE}),
    "gr_s_groups": Case(lambda **kw: _stats("gr_s_groups")(**kw), {"group_sq_norms": T([2.0, 3.0]), "mean_sq_norm": T(1.5)},
                        {"group_sq_norms": ["x", None, T([2.0]), T([[1.0, 2.0]])], "mean_sq_norm": ["x", None, T([1.0, 2.0])]}),
    "gr_t_expected": Case(lambda **kw: _stats("gr_t_expected")(**kw), {"mu_over_b": 1.0, "lr_lambda": 0.5, "beta": 0.9},
                          {"mu_over_b": NON_NEGATIVE, "lr_lambda": NON_NEGATIVE, "beta": OPEN_UNIT}),
    "gr_t_frozen": Case(lambda **kw: _stats("gr_t_frozen")(**kw), {"mu_over_b": 1.0, "beta": 0.9, "steps": 10},
                        {"mu_over_b": NON_NEGATIVE, "beta": OPEN_UNIT, "steps": POSITIVE_INT[:1] + POSITIVE_INT[2:]}),
    "EMAMoments": Case(lambda **kw: _stats("EMAMoments")(**kw), {"decay": 0.9}, {"decay": HALF_OPEN_UNIT}),
    "EMAMoments.update": Case(_method(lambda: _stats("EMAMoments")(0.9), "update"), {"x": 1.0, "y": 2.0}, {"x": ["1", None, (1.0,)], "y": ["2", None]}),
    "BiasCorrectedEMA.update_float": Case(_method(lambda: _stats("BiasCorrectedEMA")(0.9), "update_float"), {"value": 1.0},
                                          {"value": ["1", None, (1.0,)]}),
    "fieller_interval": Case(lambda **kw: _stats("fieller_interval")(**kw),
                             {"num": T(10.0), "den": T(2.0), "v_num": T(1.0), "v_den": T(0.01), "cov": T(0.0), "t": 2.0},
                             {"num": ["x", None], "den": ["x", None], "v_num": ["x", T(-1.0)], "v_den": ["x", T(-1.0)],
                              "cov": ["x", None], "t": POSITIVE}),
    "StepSizeRatio": Case(lambda **kw: _stats("StepSizeRatio")(**kw), {"decay": 0.9}, {"decay": HALF_OPEN_UNIT}),
    "StepSizeRatio.update": Case(_method(lambda: _stats("StepSizeRatio")(), "update"), {"own": 2.0, "next_": 1.0, "noise": 0.1},
                                 {"own": ["2", None], "next_": ["1", None], "noise": ["x", None], "growth": ["2", None, nan, inf, 0.5, -1.0]}),
    "StepSizeRatio.update_many": Case(_method(lambda: _stats("StepSizeRatio")(), "update_many"),
                                      {"own": T([2.0, 2.1]), "next_": T([1.0, 1.1]), "noise": T([0.1, 0.1])},
                                      {"own": ["x", T([2.0])], "next_": ["x", T([[1.0, 1.1]])], "noise": ["x", None],
                                       "growth": ["x", T([1.0]), T([0.5, 1.0]), T([nan, 1.0])]}),
    "StepSizeRatio.reading": Case(_method(lambda: _stats("StepSizeRatio")(), "reading"), {"level": 0.9}, {"level": OPEN_UNIT}),
    "ratio_interval": Case(lambda **kw: _stats("ratio_interval")(**kw),
                           {"num": 10.0, "den": 2.0, "v_num": 1.0, "v_den": 0.01, "cov": 0.0, "t": 2.0},
                           {"num": ["x", None], "den": ["x", None], "v_num": ["x", -1.0], "v_den": ["x", -1.0], "cov": ["x", None], "t": POSITIVE}),
    "LossTrend": Case(lambda **kw: _stats("LossTrend")(**kw), {"window": 50}, {"window": ["50", None, True, 2, 2.5, -1]}),
    "LossTrend.update": Case(_method(lambda: _stats("LossTrend")(), "update"), {"step": 3, "loss": 1.5},
                             {"step": ["3", None], "loss": ["x", None]}),
    "LossTrend.slope_interval": Case(_method(lambda: _stats("LossTrend")(), "slope_interval"), {"level": 0.9},
                                     {"level": OPEN_UNIT, "last": ["5", True, 2.5, 3, -1]}),
    "t_quantile": Case(lambda **kw: _stats("t_quantile")(**kw), {"level": 0.9, "df": 10.0},
                       {"level": OPEN_UNIT, "df": ["10", None, nan, 0.5, -1.0]}),
    "gsnr": Case(lambda **kw: _stats("gsnr")(**kw), {"mean_grad": T([1.0, 2.0]), "variance": T([0.5, 0.5])},
                 {"mean_grad": ["x", None], "variance": ["x", None, T([0.5, 0.5, 0.5])]}),
    "GSNRStatistic": Case(lambda **kw: _stats("GSNRStatistic")(**kw), {"decay": 0.9}, {"decay": HALF_OPEN_UNIT}),
    "GSNRStatistic.update": Case(lambda **kw: _stats("GSNRStatistic")(0.9).update(**kw),
                                 {"means": [T([1.0, 2.0])], "m2s": [T([0.5, 0.5])], "k": 2, "inv_size_sum": 0.5},
                                 {"means": [[], "x", None], "m2s": [[], [T([0.5, 0.5, 0.5])]], "k": TWO_OR_MORE,
                                  "inv_size_sum": ["1.0", nan, inf, 0.0, -1.0]}),
    "gsnr_moments": Case(lambda **kw: _stats("gsnr_moments")(**kw), {"mean": T([1.0, 2.0]), "m2": T([0.5, 0.5]), "k": 2},
                         {"mean": ["x", None], "m2": ["x", None, T([0.5, 0.5, 0.5])], "k": TWO_OR_MORE,
                          "inv_size_sum": ["1.0", nan, inf, 0.0, -1.0]}),
    "gsnr_layer_stats": Case(lambda **kw: _stats("gsnr_layer_stats")(**kw), {"ratios": [T([1.0, 2.0]), T([3.0])]},
                             {"ratios": [[], "x", None, [T([1.0]), "y"]]}),
    "gsnr_scale": Case(lambda **kw: _stats("gsnr_scale")(**kw), {"ratio": T([1.0, 2.0]), "gamma": 0.1},
                       {"ratio": ["x", None], "gamma": ["0.1", None, nan, 0.0, -0.1, 1.5]}),
    "gsnr_scale_many": Case(lambda **kw: _stats("gsnr_scale_many")(**kw),
                            {"grads": [T([1.0, 2.0])], "sq_sums": [T([3.0, 9.0])], "k": 2, "gamma": 0.1},
                            {"grads": ["x", None], "sq_sums": [[], "x", [T([1.0])]], "k": TWO_OR_MORE, "gamma": ["0.1", nan, 0.0, 1.5]}),
    "gsnr_variance": Case(lambda **kw: _stats("gsnr_variance")(**kw), {"sq_sum": T([3.0, 9.0]), "mean_grad": T([1.0, 2.0]), "k": 2},
                          {"sq_sum": ["x", None, T([1.0, 2.0, 3.0])], "mean_grad": ["x", None], "k": TWO_OR_MORE}),
    "mu_from_gr_s_groups": Case(lambda **kw: _stats("mu_from_gr_s_groups")(**kw), {"xi": 0.6, "k": 4, "group_size": 16.0},
                                {"xi": ["0.6", None, nan, inf, 0.0, 1.0, -0.5], "k": TWO_OR_MORE, "group_size": POSITIVE}),
    "noise_scale_compute": Case(lambda **kw: _stats("noise_scale_compute")(**kw), {"grad_sq": T(2.0), "trace_cov": T(10.0)},
                                {"grad_sq": ["x", None], "trace_cov": ["x", None]}),
    "noise_scale_from_moments": Case(lambda **kw: _stats("noise_scale_from_moments")(**kw),
                                     {"s_small": T(3.0), "s_big": T(2.0), "a": 0.25, "c": 0.0625},
                                     {"s_small": ["x", None], "s_big": ["x", None], "a": POSITIVE, "c": NON_NEGATIVE + [0.25, 1.0]}),
    "noise_scale_update": Case(lambda **kw: _stats("noise_scale_update")(**kw),
                               {"group_sq_norms": T([3.0, 4.0]), "mean_sq_norm": T(2.0), "group_sizes": [8, 8]},
                               {"group_sq_norms": ["x", None, T([3.0])], "mean_sq_norm": ["x", None],
                                "group_sizes": [[0, 8], [-3, 8], [8, 8, 8], "x", None, [nan, 8]]}),
    "noise_scale_update_from_sums": Case(lambda **kw: _stats("noise_scale_update_from_sums")(**kw),
                                         {"sq_norm_sum": T(7.0), "mean_sq_norm": T(2.0), "num_groups": 2, "inv_size_sum": 0.25},
                                         {"sq_norm_sum": ["x", None], "mean_sq_norm": ["x", None], "num_groups": TWO_OR_MORE,
                                          "inv_size_sum": POSITIVE, "big_coef": ["x", nan, -1.0, 1.0]}),
    # -- scaling ---------------------------------------------------------------------------------
    "eps_opt": Case(lambda **kw: _mod("scaling", "eps_opt")(**kw), {"rule": "adam", "batch": 64.0, "b_noise": 100.0, "eps_max": 1.0},
                    {"rule": ["lion", 3, None], "batch": POSITIVE, "b_noise": POSITIVE, "eps_max": POSITIVE}),
    "eps_opt_adam": Case(lambda **kw: _mod("scaling", "eps_opt_adam")(**kw), {"batch": 64.0, "b_noise": 100.0, "eps_max": 1.0},
                         {"batch": POSITIVE + [T([64.0, -64.0])], "b_noise": POSITIVE, "eps_max": POSITIVE}),
    "eps_opt_sgd": Case(lambda **kw: _mod("scaling", "eps_opt_sgd")(**kw), {"batch": 64.0, "b_noise": 100.0, "eps_max": 1.0},
                        {"batch": POSITIVE + [T([64.0, nan])], "b_noise": POSITIVE, "eps_max": POSITIVE}),
    "lr_scale_factor": Case(lambda **kw: _mod("scaling", "lr_scale_factor")(**kw), {"rule": "sgd", "old_batch": 64.0, "new_batch": 128.0, "b_noise": 100.0},
                            {"rule": ["lion", None], "old_batch": POSITIVE, "new_batch": POSITIVE, "b_noise": POSITIVE}),
    "fit_b_noise": Case(lambda **kw: _mod("scaling", "fit_b_noise")(**kw), {"steps": [250.0, 100.0, 62.5], "examples": [4000.0, 6400.0, 16000.0]},
                        {"steps": [[250.0], [nan, 100.0, 62.5], [-1.0, 100.0, 62.5], "x", None, [250.0, 100.0]],
                         "examples": [[4000.0], [0.0, 6400.0, 16000.0], [inf, 6400.0, 16000.0], "x", None]}),
    "fit_eps_max": Case(lambda **kw: _mod("scaling", "fit_eps_max")(**kw), {"rule": "sgd", "lrs": [0.1, 0.2], "batches": [16.0, 64.0], "b_noise": 50.0},
                        {"rule": ["lion", None], "lrs": [[nan, 0.2], [0.0, 0.2], [-0.1, 0.2], [0.1], [0.1, 0.2, 0.3], "x", None],
                         "batches": [[16.0], [0.0, 64.0], [nan, 64.0], "x"], "b_noise": POSITIVE}),
    "plan_batch_sizes": Case(lambda **kw: _mod("scaling", "plan_batch_sizes")(**kw), {"b_noise": 100.0, "batch_sizes": [32, 64]},
                             {"b_noise": POSITIVE, "batch_sizes": [[0], [-32], [nan], [], "x", None],
                              "reference": [(0.0, 10.0), (64.0, -100.0), (64.0,), "x"], "seconds_per_step": [5, "x"]}),
    "sign_b_noise": Case(lambda **kw: _mod("scaling", "sign_b_noise")(**kw), {"mu": T([1.0, 0.5]), "sigma": T([1.0, 2.0]), "hessian": torch.eye(2)},
                         {"mu": [1.0, "x", None, T([1.0, 0.5, 0.2])], "sigma": [1.0, T([1.0, -2.0]), T([1.0])], "hessian": [1.0, torch.eye(3), T([1.0, 2.0])]}),
    "sign_expectation": Case(lambda **kw: _mod("scaling", "sign_expectation")(**kw), {"batch": 16.0, "mu": T([1.0, 0.5]), "sigma": T([1.0, 2.0])},
                             {"batch": POSITIVE, "mu": [1.0, "x", None], "sigma": [1.0, T([1.0, 0.0]), T([1.0])]}),
    "sign_loss_improvement": Case(lambda **kw: _mod("scaling", "sign_loss_improvement")(**kw),
                                  {"batch": 16.0, "mu": T([1.0, 0.5]), "sigma": T([1.0, 2.0]), "hessian": torch.eye(2)},
                                  {"batch": POSITIVE, "mu": [1.0, "x"], "sigma": [1.0, T([1.0])], "hessian": [1.0, torch.eye(3)]}),
    "sign_optimal_lr": Case(lambda **kw: _mod("scaling", "sign_optimal_lr")(**kw),
                            {"batch": 16.0, "mu": T([1.0, 0.5]), "sigma": T([1.0, 2.0]), "hessian": torch.eye(2)},
                            {"batch": POSITIVE, "mu": [1.0, "x"], "sigma": [1.0, T([1.0])], "hessian": [1.0, torch.eye(3)]}),
    "steps_for_examples": Case(lambda **kw: _mod("scaling", "steps_for_examples")(**kw), {"examples": 5000.0, "s_min": 100.0, "e_min": 2000.0},
                               {"examples": POSITIVE + [1000.0], "s_min": POSITIVE, "e_min": POSITIVE}),
    "TradeoffFit": Case(lambda **kw: _mod("scaling", "TradeoffFit")(**kw), {"b_noise": 100.0, "s_min": 50.0, "e_min": 5000.0, "r2": 0.98},
                        {"b_noise": POSITIVE, "s_min": POSITIVE, "e_min": POSITIVE, "r2": ["x", None, nan, 1.5]}),
    # -- control ---------------------------------------------------------------------------------
    "BatchSizeController": Case(lambda **kw: _mod("control", "BatchSizeController")(**kw), {"unit": 16, "min_batch": 32, "max_batch": 1024},
                                {"unit": POSITIVE_INT, "min_batch": POSITIVE_INT + [8], "max_batch": POSITIVE_INT + [16],
                                 "band": BANDS, "hysteresis": ["0.02", None, nan, -0.1, 0.5], "cooldown": NON_NEGATIVE_INT,
                                 "max_factor": ["2", None, True, 3, 1, 2.5], "last_change": NON_NEGATIVE_INT}),
    "BatchSizeController.decide": Case(_method(lambda: _mod("control", "BatchSizeController")(unit=16, min_batch=32, max_batch=1024), "decide"),
                                       {"gr_s": 0.6, "batch": 64.0, "step": 100},
                                       {"gr_s": ["0.6", None, -0.5, 1.5], "batch": POSITIVE, "step": ["100", None, 2.5, -1],
                                        "b_simple": ["x", -5.0], "may_shrink": BOOL}),
    "LRController": Case(lambda **kw: _mod("control", "LRController")(**kw), {},
                         {"target": [inf, nan, 1.0, 0.5, "20", "manual"], "tolerance": ABOVE_ONE, "step_factor": ABOVE_ONE,
                          "cooldown": NON_NEGATIVE_INT, "min_scale": POSITIVE + [2.0], "max_scale": POSITIVE + [0.5],
                          "gain": POSITIVE, "beta": OPEN_UNIT, "last_change": NON_NEGATIVE_INT}),
    "LRController.decide": Case(_method(lambda: _mod("control", "LRController")(), "decide"), {"gr_t": 20.0, "scale": 1.0, "step": 100},
                                {"gr_t": ["20", None, -1.0], "scale": POSITIVE, "step": ["100", None, 2.5, -1],
                                 "mu_over_b": ["x", -1.0], "age": ["x", 2.5, -1]}),
    "StepSizeController": Case(lambda **kw: _mod("control", "StepSizeController")(**kw), {},
                               {"band": [(1.5, 0.7), (0.0, 1.5), (0.7, 0.9), (1.1, 1.5), (0.7,), "ab", (nan, 1.5), None],
                                "step_factor": ABOVE_ONE, "shrink_factor": ABOVE_ONE, "gain": POSITIVE, "min_pairs": TWO_OR_MORE, "first_steps": NON_NEGATIVE_INT, "min_scale": POSITIVE + [2.0],
                                "max_scale": POSITIVE + [0.5], "last_change": NON_NEGATIVE_INT, "ceiling": ["1", None, nan, 0.0, -1.0],
                                "last_action": ["x", None, 5, "HOLD"], "rise_limit": ["0.1", None, nan, 0.0, -1.0],
                                "early_rise": [1, "yes", None]}),
    "StepSizeController.diverged": Case(_method(lambda: _mod("control", "StepSizeController")(), "diverged"),
                                        {"loss": 2.0, "loss_limit": 2.5, "scale": 1.0, "step": 30, "steps": 15},
                                        {"loss": ["1", None, (1.0,)], "loss_limit": ["1", None], "scale": POSITIVE,
                                         "step": ["100", None, 2.5, -1], "steps": ["10", None, 2.5, -1]}),
    "StepSizeController.loss_limit": Case(_method(lambda: _mod("control", "StepSizeController")(), "loss_limit"),
                                          {"first_losses": [2.3, 2.2, 2.1]}, {"first_losses": ["ab", None, 2.3, ["x", 1.0]]}),
    "StepSizeController.decide": Case(_method(lambda: _mod("control", "StepSizeController")(), "decide"),
                                      {"ratio": 1.0, "interval": (0.8, 1.2), "scale": 1.0, "step": 100, "pairs": 10},
                                      {"ratio": ["1", None], "interval": [(0.8,), "ab", None, (0.8, 1.2, 1.3)], "scale": POSITIVE,
                                       "step": ["100", None, 2.5, -1], "pairs": ["10", None, 2.5, -1],
                                       "loss_slope": [(0.1,), "ab"], "recent_slope": [(0.1,), "ab", (0.1, 0.2, 0.3)],
                                       "peak_loss": ["1", (1.0,)], "loss_limit": ["1", (1.0,)]}),
    "noise_coupling": Case(lambda **kw: _mod("control", "noise_coupling")(**kw),
                           {"optimizer": torch.optim.SGD(params(), lr=0.1), "params": params()},
                           {"optimizer": [None, "sgd", nn.Linear(2, 2), torch.optim.Adagrad(params(), lr=0.1)], "params": ["x", [5], None]}),
    "step_growth": Case(lambda **kw: _mod("control", "step_growth")(**kw),
                        {"optimizer": torch.optim.SGD(params(), lr=0.1, momentum=0.9), "steps": 3},
                        {"optimizer": [None, "sgd", nn.Linear(2, 2), torch.optim.Adagrad(params(), lr=0.1)], "steps": POSITIVE_INT}),
    "gr_t_target": Case(lambda **kw: _mod("control", "gr_t_target")(**kw), {"mu_over_b": 1.0, "beta": 0.9},
                        {"mu_over_b": NON_NEGATIVE, "beta": OPEN_UNIT}),
    "lr_rule_for": Case(lambda **kw: _mod("control", "lr_rule_for")(**kw), {"optimizer": torch.optim.SGD(params(), lr=0.1)},
                        {"optimizer": [None, "sgd", nn.Linear(2, 2)]}),
    # -- capture ---------------------------------------------------------------------------------
    "GradNoiseCommState": Case(lambda **kw: _mod("capture", "GradNoiseCommState")(**kw), {},
                               {"collector": ["x", 5], "inner_hook": ["x", 5], "pack_limit": NON_NEGATIVE_INT}),
    "GradNoiseTracker": Case(lambda **kw: _mod("capture", "GradNoiseTracker")(**kw), {"params": named()},
                             {"params": ["x", None, [], [("w", "x")], 5], "statistics": ["bogus", 5, ["b_simple", 3], []],
                              "ema_decay": HALF_OPEN_UNIT, "gr_t_beta": OPEN_UNIT, "mode": ["x", 1, None], "level": OPEN_UNIT}),
    "GradNoiseTracker.begin_group": Case(_method(lambda: _mod("capture", "GradNoiseTracker")(named()).attach(), "begin_group"), {},
                                         {"scale": POSITIVE, "size": ["4", True, 0, -3, 2.5, nan]}),
    "GradNoiseTracker.finish_step": Case(_method(lambda: _mod("capture", "GradNoiseTracker")(named()).attach(), "finish_step"), {},
                                         {"loss_divisor": POSITIVE, "summarize": ["yes", 1]}),
    "GradientMomentCollector": Case(lambda **kw: _mod("capture", "GradientMomentCollector")(**kw), {"params": named()},
                                    {"params": ["x", None, [], 5], "elementwise": BOOL, "mode": ["x", 1, None]}),
    "PerExampleCollector": Case(lambda **kw: _mod("capture", "PerExampleCollector")(**kw), {"module": nn.Linear(3, 2)},
                                {"module": ["x", None, nn.Tanh(), nn.BatchNorm1d(3)]}),
    "PerExampleCollector.begin_group": Case(_method(lambda: _mod("capture", "PerExampleCollector")(nn.Linear(3, 2)).attach(), "begin_group"), {},
                                            {"scale": POSITIVE, "size": ["4", True, 0, -3, 2.5]}),
    "SharedCapture": Case(lambda **kw: _mod("capture", "SharedCapture")(**kw),
                          {"leader": _mod("capture", "GradientMomentCollector")(named(), mode="swap")},
                          {"leader": ["x", None, nn.Linear(3, 2)]}),
    "StepProbe": Case(lambda **kw: _mod("capture", "StepProbe")(**kw), {"params": nn.Linear(3, 2)},
                      {"params": [5, None, [], [torch.zeros(2)]]}),
    "StepProbe.after_step": Case(_method(lambda: _probe_after_a_step(), "after_step"), {"coupling": 0.1},
                                 {"coupling": [[0.1], [0.1, 0.1, 0.1]]}),
    "uncovered_parameters": Case(lambda **kw: _mod("capture", "uncovered_parameters")(**kw), {"module": nn.Linear(3, 2)},
                                 {"module": ["x", None, 5]}),
    "GradientMomentCollector.begin_group": Case(_method(lambda: _mod("capture", "GradientMomentCollector")(named()).attach(), "begin_group"), {},
                                                {"scale": POSITIVE, "size": ["4", True, 0, -3, 2.5]}),
    "VRSGD.set_moments": Case(_method(lambda: _mod("optim", "VRSGD")(list(nn.Linear(3, 2).parameters()), lr=0.1), "set_moments"),
                                                {"sq_sums": [torch.ones(2, 3), torch.ones(2)], "k": 2},
                                                {"sq_sums": [[torch.ones(2, 3)], [torch.ones(3, 2), torch.ones(2)], "x", None],
                                                 "k": TWO_OR_MORE}),
    "needs_groups": Case(lambda **kw: _mod("capture", "needs_groups")(**kw), {"statistics": ["b_simple"]},
                         {"statistics": ["bogus", 5, ["b_simple", 3], None]}),
    "parse_statistics": Case(lambda **kw: _mod("capture", "parse_statistics")(**kw), {"statistics": "all"},
                             {"statistics": ["bogus", 5, ["b_simple", 3], None, []]}),
    # -- optim -----------------------------------------------------------------------------------
    "GSNRScaling": Case(lambda **kw: _mod("optim", "GSNRScaling")(**kw), {}, {"gamma": ["0.1", nan, 0.0, -0.1, 1.5], "beta3": ["0.9", nan, 1.0, -0.1]}),
    "LAMB": Case(lambda **kw: _mod("optim", "LAMB")(**kw), {"params": params()},
                 {"params": ["x", None, []], "lr": LR, "betas": [(0.9,), (1.0, 0.999), (-0.1, 0.9), (0.9, nan), "x"],
                  "eps": NON_NEGATIVE, "weight_decay": NON_NEGATIVE, "trust_clip": [v for v in POSITIVE if v is not None]}),
    "LARS": Case(lambda **kw: _mod("optim", "LARS")(**kw), {"params": params()},
                 {"params": ["x", None, []], "lr": LR, "momentum": HALF_OPEN_UNIT, "weight_decay": NON_NEGATIVE,
                  "trust_coefficient": POSITIVE, "eps": NON_NEGATIVE}),
    "create_optimizer": Case(lambda **kw: _mod("optim", "create_optimizer")(**kw), {"name": "vr_sgd", "model_or_params": nn.Linear(3, 2), "lr": 0.1},
                             {"name": [None, "lion", 5], "model_or_params": ["x", None, 5], "no_decay_on_bias_and_norm": BOOL,
                              "lr": LR, "gamma": [nan, 0.0, 1.5]}),
    "OptimizerSpec": Case(lambda **kw: _mod("optim", "OptimizerSpec")(**kw), {"cls": torch.optim.SGD},
                          {"cls": [5, "SGD", None, int], "defaults": ["x", 5], "description": [5]}),
    "vr_optimizer_class": Case(lambda **kw: _mod("optim", "vr_optimizer_class")(**kw), {"base": torch.optim.SGD, "name": "VRSGD2", "beta3_default": None},
                               {"base": [5, "SGD", int, None], "name": [5, "", None], "beta3_default": ["0.9", nan, 1.0, -0.1]}),
    # -- nqm -------------------------------------------------------------------------------------
    "NQM": Case(lambda **kw: _mod("nqm", "NQM")(**kw), {"h": [1.0, 0.5], "c": [1.0, 0.5]},
                {"h": [[nan, 1.0], [], [0.0, 1.0], [-1.0, 1.0], "x", None], "c": [[-1.0, 1.0], [nan, 1.0], [1.0], "x"],
                 "weight": [[-1.0, 1.0], [1.0], [nan, 1.0]], "theta0_var": [[-1.0, 1.0], [1.0]]}),
    "NQM.paper": Case(lambda **kw: _mod("nqm", "NQM").paper(**kw), {"d": 100, "bins": 10}, {"d": POSITIVE_INT, "bins": ["10", True, 0, -3, 2.5]}),
    "NQM.risk": Case(_method(lambda: _mod("nqm", "NQM").paper(d=20, bins=5), "risk"), {"lr": 0.5, "batch": 16.0, "steps": 10.0},
                     {"lr": LR, "batch": POSITIVE, "steps": ["1.0", None, nan, -1.0], "momentum": HALF_OPEN_UNIT,
                      "precond": ["0.5", nan, -0.1, 1.5], "ema": HALF_OPEN_UNIT}),
    "NQM.steps_to_target": Case(_method(lambda: _mod("nqm", "NQM").paper(d=20, bins=5), "steps_to_target"), {"lr": 0.5, "batch": 16.0},
                                {"lr": LR, "batch": POSITIVE, "target": POSITIVE, "max_steps": POSITIVE}),
    "NQM.best_lr": Case(_method(lambda: _mod("nqm", "NQM").paper(d=20, bins=5), "best_lr"), {"batch": [16.0, 64.0]},
                        {"batch": [[0.0], [-1.0], [nan], "x"], "target": POSITIVE, "decades": POSITIVE, "iters": POSITIVE_INT}),
    # -- callbacks -------------------------------------------------------------------------------
    "BatchSizeAdapter": Case(lambda **kw: _mod("callbacks", "BatchSizeAdapter")(**kw), {},
                             {"min_batch": [v for v in POSITIVE_INT if v is not None], "max_batch": [v for v in POSITIVE_INT if v is not None], "band": BANDS, "hysteresis": ["0.02", nan, -0.1, 0.5],
                              "cooldown": NON_NEGATIVE_INT, "lr_rule": ["lion", 5], "max_factor": ["2", True, 3, 1, 2.5]}),
    "GradNoiseMonitor": Case(lambda **kw: _mod("callbacks", "GradNoiseMonitor")(**kw), {},
                             {"statistics": ["bogus", 5, []], "log_every_n_steps": ["5", True, 0, -1, 2.5], "ema_decay": HALF_OPEN_UNIT,
                              "gr_t_beta": OPEN_UNIT, "per_layer": BOOL, "histograms": BOOL, "loss_reduction": ["avg", None, 1],
                              "batch_size_fn": [5, "len"], "level": OPEN_UNIT}),
    "LRAdapter": Case(lambda **kw: _mod("callbacks", "LRAdapter")(**kw), {},
                      {"target": [inf, nan, 1.0, "20", "manual"], "tolerance": ABOVE_ONE, "step_factor": [v for v in ABOVE_ONE if v is not None],
                       "cooldown": NON_NEGATIVE_INT, "min_scale": POSITIVE + [2.0], "max_scale": POSITIVE + [0.5], "gain": [v for v in POSITIVE if v is not None],
                       "rule": ["grt", None, 5], "band": [(1.5, 0.7), (0.7,), None], "min_pairs": TWO_OR_MORE, "decay": HALF_OPEN_UNIT,
                       "shrink_factor": ABOVE_ONE, "rise_limit": ["0.1", None, nan, 0.0, -1.0]}),
    "VRMoments": Case(lambda **kw: _mod("callbacks", "VRMoments")(**kw), {}, {"loss_reduction": ["avg", None, 1], "batch_size_fn": [5, "len"]}),
    "scale_learning_rate": Case(lambda **kw: _mod("callbacks", "scale_learning_rate")(**kw),
                                {"optimizer": torch.optim.SGD(params(), lr=0.1), "schedulers": [], "factor": 2.0},
                                {"optimizer": ["x", None], "schedulers": ["x", None], "factor": POSITIVE}),
    # -- strategies ------------------------------------------------------------------------------
    "GradNoiseDDPStrategy": Case(lambda **kw: _mod("strategies", "GradNoiseDDPStrategy")(**kw), {},
                                 {"moments_hook": ["x", None, True], "bogus_kw": [1]}),
    "strategy_class": Case(lambda **kw: _mod("strategies", "strategy_class")(**kw), {"namespace": "lightning.pytorch"},
                           {"namespace": ["x", 5, None]}),
}

# the VR optimizers share one constructor: each gets the same case
for _name in ("VRSGD", "VRMomentum", "VRAdam", "VRAdamW", "VRLAMB", "VRLARS"):
    CASES[_name] = Case((lambda n: lambda **kw: _mod("optim", n)(**kw))(_name), {"params": params(), "lr": 0.1},
                        {"params": ["x", None, []], "lr": LR, "gamma": ["0.1", nan, 0.0, 1.5], "beta3": ["0.9", nan, 1.0, -0.1],
                         "moment_source": ["x", 5]})

EXEMPT = {
    "__version__": "a string",
    "GR_S_BAND": "a constant", "GR_T_TARGET": "a constant", "RULES": "a constant", "ADAM_STYLE": "a constant",
    "SGD_STYLE": "a constant", "PACK_LIMIT": "a constant", "SMALL_K": "a constant", "SUPPORTED_MODULES": "a constant", "STATISTICS": "a constant", "STRATEGY_NAMES": "a constant", "LINE_SEARCH_OPTIMIZERS": "a constant",
    "REGISTRY": "the optimizer registry, a dict",
    "MisconfigurationError": "an exception class",
    "NoiseScaleStats": "a named tuple of results the estimators return",
    "Decision": "a record of results the controllers return",
    "ReducedMoments": "a record of results GradNoiseCommState.take returns",
    "list_optimizers": "takes no arguments",
    "register_strategies": "takes no arguments",
    "destroy_process_group": "takes no arguments",
    "gradnoise_comm_hook": "called by DDP with its own arguments; register_comm_hook takes the state, checked in GradNoiseCommState",
}


def public_names() -> set[str]:
    return {name for module in MODULES for name in importlib.import_module(module).__all__}


def test_every_public_name_has_a_case_or_a_reason() -> None:
    missing = sorted(public_names() - set(CASES) - set(EXEMPT))
    assert not missing, f"public names without argument checks in this test: {missing}"
    stale = sorted({c.split(".")[0] for c in CASES} - public_names())
    assert not stale, f"cases for names that are not public: {stale}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_valid_call_works(name: str) -> None:
    case = CASES[name]
    case.call(**case.valid)


BAD = [(name, arg, i) for name, case in sorted(CASES.items()) for arg, values in case.bad.items() for i in range(len(values))]


@pytest.mark.parametrize(("name", "arg", "i"), BAD, ids=[f"{n}-{a}-{repr(CASES[n].bad[a][i])[:30]}" for n, a, i in BAD])
def test_a_bad_argument_is_refused_by_name(name: str, arg: str, i: int) -> None:
    case = CASES[name]
    value = case.bad[arg][i]
    with pytest.raises((TypeError, ValueError)) as info:
        case.call(**{**case.valid, arg: value})
    assert type(info.value) in (TypeError, ValueError), type(info.value)
    assert arg in str(info.value), f"{name}({arg}={value!r}): the message does not name {arg!r}: {info.value}"


def test_a_trainer_whose_parameters_are_all_frozen_is_refused_at_setup(tmp_path) -> None:
    import lightning.pytorch as L

    from helpers import LinRegTruth, linreg_module, trainer_kwargs
    from lightning_gradnoise import GradNoiseMonitor, MisconfigurationError

    module = linreg_module("lightning.pytorch", LinRegTruth(d=4), n_batches=4)
    for p in module.parameters():
        p.requires_grad_(False)
    trainer = L.Trainer(**trainer_kwargs(max_steps=2, accumulate_grad_batches=2, default_root_dir=tmp_path), callbacks=[GradNoiseMonitor()])
    with pytest.raises(MisconfigurationError, match="frozen.*Unfreeze"):
        trainer.fit(module)
    assert trainer.global_step == 0
