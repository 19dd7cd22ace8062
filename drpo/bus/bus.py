"""An in-process publish/subscribe bus with request/reply, built on anyio memory streams.

Why these rules:

* **Bounded buffers.** Every subscriber owns a memory stream of fixed size. A publisher waits when
  a subscriber's buffer is full, so a slow consumer slows its producers instead of growing memory.
* **Nothing is lost silently.** Publishing to a topic nobody declared raises
  :class:`UnknownTopicError`; a request to a topic with no server raises :class:`NoServerError` at
  once instead of timing out; a reply whose request is no longer waiting (it timed out, or was
  never made) still reaches the tap, is counted in :attr:`Bus.orphan_replies` and logged; a
  handler that raises answers its requester with a :class:`~drpo.bus.envelope.Failure`, which
  :meth:`Bus.request` raises as :class:`RemoteError`.
* **One tap sees everything.** The recorder subscribes to the tap and persists every envelope,
  requests and replies alike, in the order they were published.
* **Structured concurrency.** The bus owns no tasks. Servers (:meth:`Bus.serve`) run in the
  caller's task group and spawn their handlers inside it, so cancelling that group leaves nothing
  behind.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic

import anyio
import structlog
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from drpo.bus.envelope import Envelope, Failure, P

log = structlog.get_logger("drpo.bus")

#: Topic on which failures of handlers that had nobody to reply to are published.
FAILURES_TOPIC = "bus.failures"
#: Topic that carries replies (they are routed by correlation id, not by subscription).
REPLIES_TOPIC = "bus.replies"


class BusError(Exception):
    """Base class of the bus's own errors."""


class UnknownTopicError(BusError):
    """Publishing to a topic that nobody declared or subscribed to: almost always a typo."""


class NoServerError(BusError):
    """A request to a topic that has no subscriber to answer it."""


class RemoteError(BusError):
    """The handler of a request raised; carries the handler's error type and message.

    ``error`` is the handler's exception itself (the bus is in-process), so a typed caller can
    re-raise it as what it is; None when the failure came from elsewhere (a closed bus).
    """

    def __init__(
        self, failure: Failure, envelope: Envelope, error: BaseException | None = None
    ) -> None:
        super().__init__(f"{failure.error_type}: {failure.message}")
        self.failure = failure
        self.envelope = envelope
        self.error = error


class Subscription:
    """The receiving end of one subscriber: an async iterator of envelopes, closed on exit."""

    def __init__(
        self,
        bus: Bus,
        topic: str | None,
        send: MemoryObjectSendStream[Envelope],
        receive: MemoryObjectReceiveStream[Envelope],
    ) -> None:
        self._bus = bus
        self.topic = topic
        self._send = send
        self._receive = receive

    def __aiter__(self) -> AsyncIterator[Envelope]:
        return self

    async def __anext__(self) -> Envelope:
        try:
            return self._receive.receive_nowait()
        except anyio.WouldBlock:
            pass
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise StopAsyncIteration from None
        try:
            return await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            raise StopAsyncIteration from None

    async def receive(self) -> Envelope:
        return await self.__anext__()

    def receive_nowait(self) -> Envelope:
        """The next buffered envelope; raises ``anyio.WouldBlock`` when none is waiting (lets
        a consumer such as the recorder take a whole batch without yielding)."""
        return self._receive.receive_nowait()

    def close(self) -> None:
        """Stop receiving: the bus forgets this subscriber, so requests no longer reach it."""
        self._bus._unregister(self.topic, self._send)
        self._send.close()
        self._receive.close()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


@dataclass
class _Pending:
    """A request waiting for its reply."""

    done: anyio.Event = field(default_factory=anyio.Event)
    reply: Envelope | None = None
    #: The handler's exception when it failed (what the Failure reply describes).
    error: BaseException | None = None


#: Answers one request: the reply's payload, or None for a message that expects no reply.
Handler = Callable[[Envelope[P]], Awaitable[P | None]]


class Bus(Generic[P]):
    """Topic-based publish/subscribe with bounded buffers, request/reply and a tap, carrying
    payloads of type ``P`` (the search's messages, :mod:`drpo.domain`) without looking inside
    them."""

    def __init__(self, *, buffer_size: int = 1024, orphan_log_size: int = 1000) -> None:
        self.buffer_size = buffer_size
        self._subscribers: dict[str, list[MemoryObjectSendStream[Envelope]]] = {}
        self._declared: set[str] = {FAILURES_TOPIC, REPLIES_TOPIC}
        self._taps: list[MemoryObjectSendStream[Envelope]] = []
        self._pending: dict[str, _Pending] = {}
        #: Replies that arrived for no waiting request, most recent last (bounded).
        self.orphan_replies: deque[Envelope] = deque(maxlen=orphan_log_size)
        self.orphan_reply_count = 0
        self.published_count = 0

    # ---------------------------------------------------------------- subscribing

    def declare(self, *topics: str) -> None:
        """Make topics known, so that publishing to them is valid even with no subscriber."""
        self._declared.update(topics)

    def subscribe(self, topic: str, *, buffer_size: int | None = None) -> Subscription:
        send, receive = anyio.create_memory_object_stream[Envelope](
            buffer_size if buffer_size is not None else self.buffer_size
        )
        self._declared.add(topic)
        self._subscribers.setdefault(topic, []).append(send)
        return Subscription(self, topic, send, receive)

    def tap(self, *, buffer_size: int | None = None) -> Subscription:
        """A subscription to every envelope published on the bus, in publish order."""
        send, receive = anyio.create_memory_object_stream[Envelope](
            buffer_size if buffer_size is not None else self.buffer_size
        )
        self._taps.append(send)
        return Subscription(self, None, send, receive)

    def _unregister(self, topic: str | None, stream: MemoryObjectSendStream[Envelope]) -> None:
        streams = self._taps if topic is None else self._subscribers.get(topic, [])
        if stream in streams:
            streams.remove(stream)

    def has_subscribers(self, topic: str) -> bool:
        return bool(self._subscribers.get(topic))

    # ---------------------------------------------------------------- publishing

    async def publish(self, envelope: Envelope) -> None:
        """Deliver to the taps, then to every subscriber of the topic, waiting on full buffers."""
        topic = envelope.topic
        if topic not in self._declared:
            raise UnknownTopicError(
                f"no one declared or subscribed to topic {topic!r}; "
                "call bus.declare(topic) or subscribe first"
            )
        await self._deliver(self._taps, envelope)
        self.published_count += 1  # counted once the taps (the recorder) have it
        await self._deliver(self._subscribers.get(topic), envelope)

    async def _deliver(
        self, streams: list[MemoryObjectSendStream[Envelope]] | None, envelope: Envelope
    ) -> int:
        """Send to each stream, waiting on full buffers; returns how many accepted it."""
        if not streams:
            return 0
        delivered = 0
        for stream in tuple(streams):
            try:
                try:
                    stream.send_nowait(envelope)
                except anyio.WouldBlock:
                    await stream.send(envelope)  # backpressure: wait for the slow consumer
                delivered += 1
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                if stream in streams:
                    streams.remove(stream)  # that subscriber has gone away
        return delivered

    async def emit(
        self,
        topic: str,
        payload: P,
        *,
        sender: str,
        run_id: str | None = None,
        node_id: str | None = None,
        causation_id: str | None = None,
    ) -> Envelope:
        """Wrap a payload in an envelope and publish it; returns the envelope."""
        envelope = Envelope(
            payload=payload,
            topic=topic,
            sender=sender,
            run_id=run_id,
            node_id=node_id,
            causation_id=causation_id,
        )
        await self.publish(envelope)
        return envelope

    # ---------------------------------------------------------------- request / reply

    async def request(
        self,
        topic: str,
        payload: P,
        *,
        sender: str,
        run_id: str | None = None,
        node_id: str | None = None,
        causation_id: str | None = None,
        timeout: float | None = None,
    ) -> Envelope:
        """Publish a request and wait for its reply envelope.

        Raises :class:`NoServerError` when nobody serves ``topic``, :class:`TimeoutError` when no
        reply arrives within ``timeout`` seconds, and :class:`RemoteError` when the handler failed.
        """
        if not self.has_subscribers(topic):
            raise NoServerError(f"no agent serves topic {topic!r}")
        envelope = Envelope(
            payload=payload,
            topic=topic,
            sender=sender,
            run_id=run_id,
            node_id=node_id,
            causation_id=causation_id,
        )
        pending = self._pending[envelope.message_id] = _Pending()
        try:
            await self._deliver(self._taps, envelope)
            self.published_count += 1
            if not await self._deliver(self._subscribers.get(topic), envelope):
                raise NoServerError(f"no agent serves topic {topic!r} any more")
            if timeout is None:  # no cancel scope: a deadline-less one costs 10 us per request
                await pending.done.wait()
            else:
                with anyio.fail_after(timeout):
                    await pending.done.wait()
        finally:
            self._pending.pop(envelope.message_id, None)
        reply = pending.reply
        assert reply is not None
        if isinstance(reply.payload, Failure):
            raise RemoteError(reply.payload, reply, pending.error)
        return reply

    async def reply(self, request: Envelope, payload: P, *, sender: str) -> bool:
        """Answer ``request``. Returns False when no one was waiting (the reply is an orphan)."""
        envelope = Envelope(
            payload=payload,
            topic=REPLIES_TOPIC,
            sender=sender,
            run_id=request.run_id,
            node_id=request.node_id,
            correlation_id=request.message_id,
            causation_id=request.message_id,
        )
        return await self.deliver_reply(envelope)

    async def deliver_reply(self, envelope: Envelope) -> bool:
        """Route a reply envelope to its waiting request (and to the taps, always)."""
        await self.publish(envelope)
        pending = self._pending.get(envelope.correlation_id or "")
        if pending is None or pending.done.is_set():
            self.orphan_reply_count += 1
            self.orphan_replies.append(envelope)
            log.warning(
                "orphan reply",
                correlation_id=envelope.correlation_id,
                sender=envelope.sender,
                kind=envelope.payload.kind,
            )
            return False
        pending.reply = envelope
        pending.done.set()
        return True

    # ---------------------------------------------------------------- serving

    async def serve(
        self,
        topic: str,
        handler: Handler[P],
        *,
        sender: str,
        task_group: TaskGroup,
        limit: int | None = None,
        ready: anyio.Event | None = None,
    ) -> None:
        """Answer every message on ``topic`` with ``handler``, each in its own task of
        ``task_group`` (at most ``limit`` at once). Runs until the task group is cancelled.

        A handler's return value is sent as the reply; an exception becomes a
        :class:`Failure` reply (or, for messages that expect none, a Failure on
        :data:`FAILURES_TOPIC`), and serving goes on.
        """
        limiter = anyio.CapacityLimiter(limit) if limit else None
        async with self.subscribe(topic) as subscription:
            if ready is not None:
                ready.set()
            async for envelope in subscription:
                if limiter is not None:
                    await limiter.acquire_on_behalf_of(envelope.message_id)
                task_group.start_soon(self._handle, handler, envelope, sender, limiter)

    async def _handle(
        self,
        handler: Handler[P],
        envelope: Envelope,
        sender: str,
        limiter: anyio.CapacityLimiter | None,
    ) -> None:
        try:
            try:
                result: P | Failure | None = await handler(envelope)
            except anyio.get_cancelled_exc_class():
                raise
            except Exception as exc:  # a failing handler must not take the bus down
                log.warning("handler failed", topic=envelope.topic, error=repr(exc))
                result = Failure(error_type=type(exc).__name__, message=str(exc))
                pending = self._pending.get(envelope.message_id)
                if pending is not None:
                    pending.error = exc
                else:
                    await self.emit(
                        FAILURES_TOPIC,
                        result,
                        sender=sender,
                        run_id=envelope.run_id,
                        node_id=envelope.node_id,
                        causation_id=envelope.message_id,
                    )
                    return
            if result is None and envelope.message_id in self._pending:
                result = Failure(
                    error_type="NoReply", message=f"the {envelope.topic} handler gave no reply"
                )
            if result is not None:
                await self.reply(envelope, result, sender=sender)
        finally:
            if limiter is not None:
                limiter.release_on_behalf_of(envelope.message_id)

    # ---------------------------------------------------------------- shutdown

    def close(self) -> None:
        """Close every stream: subscribers' iterations end, later publishes to them are dropped."""
        for streams in (*self._subscribers.values(), self._taps):
            for stream in streams:
                stream.close()
        self._subscribers.clear()
        self._taps.clear()
        for message_id, pending in list(self._pending.items()):
            pending.reply = Envelope(
                payload=Failure(error_type="BusClosed", message="the bus was closed"),
                topic=REPLIES_TOPIC,
                sender="bus",
                correlation_id=message_id,
            )
            pending.done.set()
