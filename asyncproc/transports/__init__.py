"""Queue transports behind one small interface (see base.py)."""
from __future__ import annotations

from asyncproc.transports.base import (
    Delivery,
    Producer,
    ProducerError,
    ResultReader,
    ResultRoute,
    Transport,
    TransportError,
    Unconfirmed,
    Writes,
)


def open_transport(settings) -> Transport:
    """The transport `--message-queue-impl` names, given its own section of the settings and
    the request queues it reads."""
    impl, queues = settings.message_queue_impl, settings.queue_names
    if impl == "redis-pubsub":
        from asyncproc.transports.redis_pubsub import RedisPubSub

        return RedisPubSub(settings.redis, queues, settings.messages.max_message_bytes)
    if impl == "redis-sortedset":
        from asyncproc.transports.redis_sortedset import RedisSortedSet

        return RedisSortedSet(settings.redis, queues, settings.messages.result_format)
    if impl == "redis-streams":
        from asyncproc.transports.redis_streams import RedisStreams

        return RedisStreams(settings.redis, queues)
    if impl == "gcp-pubsub":
        from asyncproc.transports.gcp_pubsub import GcpPubSub

        return GcpPubSub(settings.gcp, queues, settings.messages.result_format)
    raise ValueError(f"unknown transport {impl!r}")


def open_producer(settings, queue: str) -> Producer:
    """The producer's side of the transport `--message-queue-impl` names, for `queue`."""
    impl = settings.message_queue_impl
    if impl == "gcp-pubsub":
        from asyncproc.transports.gcp_producer import GcpProducer

        return GcpProducer(settings.gcp, queue)
    from asyncproc.transports.redis_producer import PRODUCERS

    if impl not in PRODUCERS:
        raise ValueError(f"unknown transport {impl!r}")
    return PRODUCERS[impl](settings.redis, queue, lambda: open_transport(settings), settings.messages.result_format)


__all__ = ["Delivery", "Producer", "ProducerError", "ResultReader", "ResultRoute", "Transport", "TransportError", "Unconfirmed",
           "Writes", "open_producer", "open_transport"]
