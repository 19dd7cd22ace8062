"""The in-process async message bus: typed envelopes, publish/subscribe, request/reply, a tap."""

from drpo.bus.bus import (
    FAILURES_TOPIC,
    REPLIES_TOPIC,
    Bus,
    BusError,
    NoServerError,
    RemoteError,
    Subscription,
    UnknownTopicError,
)
from drpo.bus.envelope import Envelope, Failure

__all__ = [
    "FAILURES_TOPIC",
    "REPLIES_TOPIC",
    "Bus",
    "BusError",
    "Envelope",
    "Failure",
    "NoServerError",
    "RemoteError",
    "Subscription",
    "UnknownTopicError",
]
