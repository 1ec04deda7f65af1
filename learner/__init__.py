"""Tiller's learning side: annotator sidecar, dataset builders, objectives, trainer, publisher."""
