"""The shared core: what both the bridge and the workers import (settings, the message
contract, Redis key names, classified errors, logging, deliberation state, the NATS outbox).
Python 3.9 compatible; never imports gRPC, protobuf, Ray or the dashboard
(docs/architecture.md)."""
