"""Tiller's serving side: gRPC front end over a vLLM engine."""
