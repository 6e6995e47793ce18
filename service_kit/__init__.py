"""Infrastructure shared by both services: configuration, logging, the error model, migrations,
database readiness and the gRPC server lifecycle.

It holds no domain logic: the services share the wire contract (protos/ -> gen/) and this
plumbing, nothing else, so either can still be built and deployed alone.
"""
