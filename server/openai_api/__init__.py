"""The OpenAI-compatible HTTP API: it translates OpenAI requests to the request service's values
and back, exactly as the gRPC servicer does for protobuf. No generation logic lives here."""
