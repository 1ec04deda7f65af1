"""Generated stubs for the ``tiller.v1`` API.

Do not edit ``*_pb2*``; run ``python -m tiller.protos.generate``.
"""
