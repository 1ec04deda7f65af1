"""Offline tools, kept off the request path: model preparation (GGUF -> HF), test-model and
random-LoRA builders, steering-heads builders and their CLI, the ``tiller up`` demo."""
