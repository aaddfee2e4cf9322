"""Test helpers shipped with farmhand: a real loopback webhook sink for demos, tests and benchmarks.

:mod:`farmhand.testing.sink` holds :class:`~farmhand.testing.sink.WebhookSink`, an HTTP
server (standard library only) that honours ``Idempotency-Key``, records every call and can
be told by path to fail, reject, rate-limit, stall or flake. Import it from that module; this
package imports nothing so that ``python -m farmhand.testing.sink`` runs cleanly.
"""
