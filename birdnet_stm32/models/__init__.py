"""Keras models: the in-graph frontend layers (:mod:`.frontend`) and the DS-CNN builder (:mod:`.dscnn`)."""

from birdnet_stm32.models import frontend  # noqa: F401  (registers the custom layers with Keras)
from birdnet_stm32.models.dscnn import build_dscnn, build_model, format_summary, model_summary

__all__ = ["build_dscnn", "build_model", "format_summary", "model_summary"]
