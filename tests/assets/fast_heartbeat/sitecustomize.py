"""Put on PYTHONPATH of a SuperNode in tests: it sends Flower's heartbeat every few seconds and
declares a 10 s interval (Flower's minimum, HEARTBEAT_MIN_INTERVAL) instead of 30 s, so the
SuperLink marks it offline 20 s after it dies instead of 60 s. Flower 1.42 has no setting for it
(flwr.common.constant, read by the SuperNode's connection and heartbeat sender at import); what a
dead node does to a round is the same, only the wait is shorter."""

import flwr.common.constant as _constant

_constant.HEARTBEAT_DEFAULT_INTERVAL = _constant.HEARTBEAT_MIN_INTERVAL
