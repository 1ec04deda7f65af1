"""Formats shared by the server and the learner: one owner each, no grpc, torch or vLLM.

- ``errors``: the request-level exception classes (the gRPC status table lives in the server).
- ``manifest``: adapter version manifests, names, the safetensors-only rule, sha256.
- ``prompt``: chat turns and feedback conditioning (how a tag renders into a prompt).
- ``heads``: the steering-heads artifact (CMPO attribute heads).
- ``registry``: the registry layout and ``state.json`` (read by the server, written by the learner).
- ``publish``: publishing a trained adapter as the next immutable registry version.
- ``sections``: typed config tables (pydantic's strict JSON rules, errors naming the key).
- ``hardware``: CPU capabilities both sides decide precision on (native bf16).
- ``logstore``: the generation log's schema, migrations and typed store API.
"""
