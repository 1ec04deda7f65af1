"""Tiller's protocol buffers: sources under ``tiller/v1`` and their committed generated stubs."""
