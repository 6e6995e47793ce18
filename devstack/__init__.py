"""The developer stack: embedded PostgreSQL, both services and the Envoy gateway (`make run`).

`devstack.postgres` and `devstack.gateway` are also used by the tests; they print nothing and keep
no global state.
"""
