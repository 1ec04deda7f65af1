"""Attribute steering (CMPO plural heads) served inside vLLM: artifact, model plugin, processor."""
