"""Typed Python client for Tiller.

>>> from tiller.client import Client
>>> with Client("127.0.0.1:50051") as c:  # doctest: +SKIP
...     print(c.generate("Hello", feedback="Harmless and very helpful").text)
"""

from .client import AsyncClient, Client, ClientTls
from .errors import TillerClientError
from .results import (
    AdapterInfo,
    Completion,
    FeedbackReceipt,
    Generation,
    ServerStatus,
    StreamChunk,
    TokenLogprob,
    TopLogprob,
)

__all__ = [
    "AdapterInfo",
    "AsyncClient",
    "Client",
    "ClientTls",
    "Completion",
    "FeedbackReceipt",
    "Generation",
    "ServerStatus",
    "StreamChunk",
    "TillerClientError",
    "TokenLogprob",
    "TopLogprob",
]
