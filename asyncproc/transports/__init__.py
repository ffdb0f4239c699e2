"""Queue transports behind one small interface (see base.py)."""
from __future__ import annotations

from asyncproc.transports.base import (
    Delivery,
    Producer,
    ProducerError,
    ResultReader,
    Transport,
    TransportError,
    Unconfirmed,
    Writes,
)


def open_transport(settings) -> Transport:
    """The transport `--message-queue-impl` names."""
    if settings.message_queue_impl == "redis-pubsub":
        from asyncproc.transports.redis_pubsub import RedisPubSub

        return RedisPubSub(settings)
    if settings.message_queue_impl == "redis-sortedset":
        from asyncproc.transports.redis_sortedset import RedisSortedSet

        return RedisSortedSet(settings)
    if settings.message_queue_impl == "redis-streams":
        from asyncproc.transports.redis_streams import RedisStreams

        return RedisStreams(settings)
    if settings.message_queue_impl == "gcp-pubsub":
        from asyncproc.transports.gcp_pubsub import GcpPubSub

        return GcpPubSub(settings)
    raise ValueError(f"unknown transport {settings.message_queue_impl!r}")


def open_producer(settings, queue: str) -> Producer:
    """The producer's side of the transport `--message-queue-impl` names, for `queue`."""
    if settings.message_queue_impl == "gcp-pubsub":
        from asyncproc.transports.gcp_producer import GcpProducer

        return GcpProducer(settings, queue)
    from asyncproc.transports.redis_producer import PRODUCERS

    if settings.message_queue_impl not in PRODUCERS:
        raise ValueError(f"unknown transport {settings.message_queue_impl!r}")
    return PRODUCERS[settings.message_queue_impl](settings, queue)


__all__ = ["Delivery", "Producer", "ProducerError", "ResultReader", "Transport", "TransportError", "Unconfirmed",
           "Writes", "open_producer", "open_transport"]
