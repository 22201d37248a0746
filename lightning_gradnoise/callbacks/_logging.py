"""Writing scalars and histograms to whatever loggers a Trainer has."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from torch import Tensor

__all__ = ["log_scalars", "log_histograms"]


def log_scalars(loggers: Iterable[Any], metrics: Mapping[str, float], step: int) -> None:
    """Every Lightning logger takes scalars through ``log_metrics``."""
    for logger in loggers:
        logger.log_metrics(dict(metrics), step=step)


def log_histograms(loggers: Iterable[Any], values: Mapping[str, Tensor], step: int) -> None:
    """TensorBoard (``SummaryWriter.add_histogram``) and W&B (``wandb.Histogram``); others are skipped."""
    for logger in loggers:
        kind = type(logger).__name__
        if kind == "TensorBoardLogger":
            writer = logger.experiment
            for tag, v in values.items():
                writer.add_histogram(tag, v.numpy(), global_step=step)
        elif kind == "WandbLogger":
            import wandb

            logger.experiment.log(
                {**{tag: wandb.Histogram(v.numpy()) for tag, v in values.items()}, "trainer/global_step": step}
            )
