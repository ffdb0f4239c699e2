"""Queue transports behind one small interface (see base.py)."""
from __future__ import annotations

from asyncproc.transports.base import Delivery, Transport, TransportError, Unconfirmed, Writes


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


__all__ = ["Delivery", "Transport", "TransportError", "Unconfirmed", "Writes", "open_transport"]
