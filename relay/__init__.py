"""konnect-relay: an HTTP CONNECT relay for Kong Gateway data planes that must
reach Kong Konnect from networks without direct egress.

Architecture, from the outside in:

- ``server``: listeners and the per-connection lifecycle. A connection reads
  its request head (``connect``, a sans-IO parser), the ``policy`` (pure)
  decides from the Konnect presets and the allow/deny patterns, an ``egress``
  dialer reaches the destination (``resolver`` checks every address it will
  dial), and only then does the client get ``HTTP/1.1 200``.
- ``tunnel``: the hot path. Two transports and two small protocol objects copy
  bytes both ways with symmetric backpressure and forwarded half-close; the
  relay never terminates TLS, so the data plane's mTLS with the control plane
  is end to end.
- ``metrics`` and ``admin``: Prometheus counters folded from the tunnels'
  integer counters; /metrics, /healthz, /readyz, /tunnels.
- ``config``: the strict YAML schema and the runtime settings; ``cli``: the
  ``run``, ``check`` and ``policy`` commands.
"""

__version__ = "0.1.0"
