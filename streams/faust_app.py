"""Faust app factory: the same Avro codec and catalog topics as the aiokafka helpers.

A Faust agent built here reads and writes the typed events of ``streams.events``;
bytes it cannot decode go to ``dead_letter`` with the reason and the agent goes on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import faust
from faust.exceptions import ValueDecodeError
from faust.serializers import codecs
from faust.types import AppT, Message

from streams.codec import EventCodec, default_codec
from streams.config import BrokerSettings, data_root, kafka_auth
from streams.errors import DecodeError
from streams.events import DeadLetter, Event
from streams.kafka import KafkaSettings, dead_letter
from streams.topics import PARTITIONS, create_compacted_topics, spec_for

__all__ = ["CODEC_NAME", "EventTopic", "create_app", "event_topic", "register_codec", "start_app"]

CODEC_NAME = "orch-avro"
log = logging.getLogger(__name__)


def _patch_producer_buffer() -> None:
    """Make Faust's producer flush wait until its buffer is really sent.

    Table writes (changelog records) go through ``ProducerBuffer``; the consumer flushes
    the producer before it commits offsets, so that a committed input never outlives
    the state it produced. But ``ProducerBuffer.flush`` gives up after 0.1 s without a
    message sent (a slow or unreachable broker) and does not count the message being
    handed to the client: the offset could then be committed with the goal's record
    still unwritten, and a crash lost the decision for good (the chaos bench's requests
    with no outcome, after budget kills around broker outages). This flush returns only
    once nothing is queued or being handed over; the client's own flush that follows
    waits for the broker's acknowledgement.
    """
    from faust.transport.producer import ProducerBuffer

    if getattr(ProducerBuffer, "_orch_patched", False):
        return
    send_pending = ProducerBuffer._send_pending

    async def _send_pending(self: Any, fut: Any) -> None:
        self._orch_sending = getattr(self, "_orch_sending", 0) + 1
        try:
            await send_pending(self, fut)
        finally:
            self._orch_sending -= 1

    async def flush(self: Any) -> None:
        while self.size or getattr(self, "_orch_sending", 0):
            self.message_sent.clear()
            try:
                await asyncio.wait_for(self.message_sent.wait(), timeout=0.1)
            except TimeoutError:
                if self.state != "running" and self.size:
                    raise RuntimeError("Cannot flush: Producer not Running") from None

    ProducerBuffer._send_pending = _send_pending  # type: ignore[method-assign]
    ProducerBuffer.flush = flush  # type: ignore[method-assign]
    ProducerBuffer._orch_patched = True  # type: ignore[attr-defined]


_patch_producer_buffer()


def _patch_commit_order() -> None:
    """Table writes reach the broker before the events they decided, then the offset.

    A Faust agent's sends are attached to its input and published when that input's
    offset is committed, before the producer (and so the table's changelog) is flushed.
    A kill in between left the events out and the state that decided them lost: the
    input, read again, was decided again from the older state, and could differ (chaos
    seed 6: a run the budget had admitted and the loader had answered was later failed
    by the budget as a timeout, under the same terminal id). Flushing first makes a
    kill leave the state written and the events not sent, which a replay sends again.
    """
    from faust.transport.consumer import Consumer

    if getattr(Consumer, "_orch_patched", False):
        return
    handle_attached = Consumer._handle_attached

    async def _handle_attached(self: Any, commit_offsets: Any) -> None:
        await self.app.producer.flush()
        await handle_attached(self, commit_offsets)

    Consumer._handle_attached = _handle_attached  # type: ignore[method-assign]
    Consumer._orch_patched = True  # type: ignore[attr-defined]


_patch_commit_order()


def _patch_stale_acks() -> None:
    """Only the generation that read an input, with the flow running, may mark it done.

    Faust's streams acknowledge what they skip, and they skip every input read before a
    rebalance (an older consumer generation) or taken while the flow is suspended. Such an
    input was never processed, yet its offset joined the acknowledged ones; the revocation
    had forgotten the committed offset (so no gap check held) and the commit timer kept
    running through the table's recovery, so the offset after it was committed, and the
    seek that ends the recovery started there: every input between the last commit and the
    skipped one was never processed by anyone (requests left with no outcome after
    ``task_requested`` in the chaos bench, where the budget is killed around broker
    outages). Refused here, such an input is read again after the seek, as Faust intends.
    """
    from faust.transport.consumer import Consumer

    if getattr(Consumer.ack, "_orch_patched", False):
        return
    ack = Consumer.ack

    def guarded_ack(self: Any, message: Any) -> bool:
        app = self.app
        stale = message.generation_id is not None and (
            message.generation_id != app.consumer_generation_id
        )
        if stale or not app.flow_control.is_active():
            self._unacked_messages.discard(message)
            return False
        return bool(ack(self, message))

    guarded_ack._orch_patched = True  # type: ignore[attr-defined]
    Consumer.ack = guarded_ack  # type: ignore[method-assign]


_patch_stale_acks()


class _AvroEventCodec(codecs.Codec):
    """Faust codec over :class:`streams.codec.EventCodec`."""

    def __init__(self, codec: EventCodec) -> None:
        super().__init__()
        self._codec = codec

    def _dumps(self, obj: Any) -> bytes:
        if isinstance(obj, Event):
            return self._codec.encode(obj)
        raise TypeError(f"{CODEC_NAME} encodes events, not {type(obj).__name__}")

    def _loads(self, s: bytes) -> Any:
        return self._codec.decode(s)


def register_codec(codec: EventCodec | None = None) -> None:
    codecs.register(CODEC_NAME, _AvroEventCodec(codec or default_codec()))


class EventTopic(faust.Topic):
    """A catalog topic whose undecodable values are dead-lettered instead of crashing agents."""

    def __init__(
        self,
        *args: Any,
        event_source: str = "faust",
        event_settings: KafkaSettings | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.source = event_source
        self.settings = event_settings

    def _compile_decode(self) -> None:
        super()._compile_decode()
        decode = self.decode

        async def checked(message: Message, *, propagate: bool = False) -> Any:
            # The codec (Faust's, shared by every topic) does not know the topic: what it
            # decoded is checked here as our own consumers check it (streams/codec.py),
            # and against the record's key, which decides the partition and so which
            # instance owns the goal's state.
            event = await decode(message, propagate=propagate)
            problem = self._misplaced(event.value if event is not None else None, message)
            if problem is None:
                return event
            exc = ValueDecodeError(problem)
            exc.__cause__ = DecodeError(problem, topic=message.topic)
            if propagate:
                raise exc
            await self.on_value_decode_error(exc, message)
            return None

        self.decode = checked  # type: ignore[method-assign]

    def _misplaced(self, value: Any, message: Message) -> str | None:
        if not isinstance(value, Event):
            return None  # the codec's own errors went their way already
        logical = self.settings.logical(message.topic) if self.settings else message.topic
        if value.topic != logical:
            return f"a {value.topic} event does not belong on this topic"
        key = value.key()
        if key is not None and message.key != key:
            shown = message.key[:80] if isinstance(message.key, bytes) else message.key
            return (
                f"the record's key {shown!r} is not the event's {value.key_field}"
                f" {key.decode('utf-8', 'replace')!r}"
            )
        return None

    def _clone_args(self) -> Mapping[str, Any]:
        # Agents subscribe through clones; they must keep where dead letters go.
        return {
            **super()._clone_args(),
            "event_source": self.source,
            "event_settings": self.settings,
        }

    async def on_value_decode_error(self, exc: Exception, message: Message) -> None:
        cause = exc.__cause__ if isinstance(exc.__cause__, DecodeError) else exc
        reason = cause.reason if isinstance(cause, DecodeError) else str(exc)
        physical = message.topic
        logical = self.settings.logical(physical) if self.settings else physical
        log.warning("dead letter from %s@%s: %s", physical, message.offset, reason)
        dead = dead_letter(
            source=self.source,
            topic=logical,
            partition=message.partition,
            offset=message.offset,
            key=message.key if isinstance(message.key, bytes) else None,
            payload=message.value if isinstance(message.value, bytes) else b"",
            reason=reason,
            error_type=type(cause).__name__,
        )
        prefix = self.settings.prefix if self.settings else ""
        await self.app.send(prefix + DeadLetter.topic, key=dead.key(), value=dead)


# aiokafka sends a broker no fetch while a partition fetched from it holds records not yet
# taken, for up to ``prefetch_backoff`` (0.1 s); then it sends one that leaves that
# partition out, and the broker may hold that fetch for the whole wait (Faust asks for
# 1.5 s) when the partitions it names stay quiet. Faust "pauses" a partition only by not
# asking for it (its tables' changelogs, once recovered, are never asked for), so the
# records fetched for those held every fetch back 0.1 s: the budget's hop was 45 ms at
# the median at one answer at a time (docs/performance.md, "Tuning tried").
# A 1 ms back-off for every partition cured that and did worse under load: records of a
# partition Faust does take, left untaken 1 ms while it was busy, were left out of the
# next fetch, held up to 1.5 s. After a 2 s pause the budget read the loader's answers
# 0.8 s late from then on, holding each slot that much longer, and one goal at 20 requests
# a second never recovered ("A held fetch"). Now only partitions Faust did not ask for
# in its last read lose the back-off; the ones it takes keep aiokafka's.
#
# aiokafka's fetch loop looks again this often when nothing wakes it (an idle consumer);
# records and assignments wake it at once. Faust leaves aiokafka's 0.2 s; our own consumers
# set consumer_timeout_ms to the same 1 s (streams/kafka.py).
FAUST_FETCHER_TIMEOUT_S = 1.0


def _faust_fetcher() -> None:
    """Faust builds its aiokafka consumer inside its consumer thread with no way to pass
    the fetch loop's timeout, nor to say which partitions it leaves alone; set both where
    aiokafka builds and runs the fetcher, for Faust's consumers (the ones started from a
    Faust consumer thread) only."""
    from aiokafka.consumer import fetcher

    cls = fetcher.Fetcher
    if getattr(cls.__init__, "_orch_faust", False):
        return
    init0, fetched0, actions0 = cls.__init__, cls.fetched_records, cls._get_actions_per_node

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        if _in_faust_consumer_thread():
            kwargs["fetcher_timeout"] = FAUST_FETCHER_TIMEOUT_S
            self._orch_asked = frozenset()  # what Faust last asked for; None elsewhere
        init0(self, *args, **kwargs)

    async def fetched_records(
        self: Any, partitions: Any, timeout: float = 0, max_records: int | None = None
    ) -> Any:
        if partitions and getattr(self, "_orch_asked", None) is not None:
            self._orch_asked = frozenset(partitions)
        return await fetched0(self, partitions, timeout, max_records)

    def get_actions(self: Any, assignment: Any) -> Any:
        asked = getattr(self, "_orch_asked", None)
        if asked:
            for tp, held in self._records.items():
                if tp not in asked:
                    held._backoff = 0.0  # not taken until Faust asks: no reason to wait
        return actions0(self, assignment)

    init._orch_faust = True  # type: ignore[attr-defined]
    cls.__init__ = init
    cls.fetched_records = fetched_records
    cls._get_actions_per_node = get_actions


def _in_faust_consumer_thread() -> bool:
    import threading

    from mode.threads import WorkerThread

    return isinstance(threading.current_thread(), WorkerThread)


def create_app(
    name: str,
    settings: KafkaSettings,
    *,
    store: str = "memory://",
    **conf: Any,
) -> faust.App:
    """A Faust app on the platform's broker, codec and topic naming."""
    register_codec()
    _faust_fetcher()
    datadir = data_root() / "faust" / (settings.prefix + name)
    datadir.mkdir(parents=True, exist_ok=True)
    broker = ";".join(f"kafka://{h.strip()}" for h in settings.bootstrap.split(","))
    defaults: dict[str, Any] = {
        "broker": broker,
        "store": store,
        "datadir": str(datadir),
        "value_serializer": CODEC_NAME,
        "key_serializer": "raw",
        "topic_partitions": PARTITIONS,
        "topic_replication_factor": 1,
        "web_enabled": False,
        "producer_linger_ms": 0,
        "producer_acks": -1,
        "consumer_auto_offset_reset": "earliest",
        "stream_wait_empty": False,
        "broker_commit_every": 100,
        "broker_commit_interval": max(0.5, BrokerSettings.read("commit_interval_ms") / 1000.0),
        # A crashed instance should hand its partitions over in seconds, not a minute.
        "broker_session_timeout": 10.0,
        "broker_heartbeat_interval": 1.0,
    }
    auth = kafka_auth()
    if "sasl_mechanism" in auth:
        defaults["broker_credentials"] = faust.SASLCredentials(
            username=auth["sasl_plain_username"],
            password=auth["sasl_plain_password"],
            mechanism=auth["sasl_mechanism"],
            ssl_context=auth.get("ssl_context"),  # SASL_SSL with one
        )
    elif "ssl_context" in auth:
        defaults["broker_credentials"] = faust.SSLCredentials(auth["ssl_context"])
    defaults.update(conf)
    return faust.App(settings.prefix + name, **defaults)


def event_topic(app: AppT, name: str, settings: KafkaSettings, *, source: str) -> EventTopic:
    """The catalog topic ``name`` as a Faust topic of typed events."""
    spec = spec_for(name)
    topic = EventTopic(
        app,
        topics=[settings.topic(spec.name)],
        key_serializer="raw",
        value_serializer=CODEC_NAME,
        partitions=spec.partitions,
        event_source=source,
        event_settings=settings,
    )
    return topic


async def start_app(app: faust.App, settings: KafkaSettings) -> None:
    """Start ``app`` once its tables' changelog topics exist with their leaders."""
    changelogs = {t.changelog_topic_name: t.partitions or PARTITIONS for t in app.tables.values()}
    if changelogs:
        await create_compacted_topics(settings.bootstrap, changelogs)
    await app.start()
