"""The doors: the gRPC server, its settings, interceptors, error mapping and servicers, the
OpenAI-compatible HTTP door and the Prometheus metrics."""
