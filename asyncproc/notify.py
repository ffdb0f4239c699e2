"""systemd's notify protocol (sd_notify(3)): READY=1, STOPPING=1, WATCHDOG=1, STATUS=...

One datagram to the socket named by $NOTIFY_SOCKET (a path, or "@name" for an abstract
socket). Without $NOTIFY_SOCKET every call does nothing, so the supervisor can always call.
"""
from __future__ import annotations

import logging
import os
import socket
from typing import Mapping, Optional

log = logging.getLogger("asyncproc.notify")


class Notifier:
    def __init__(self, environ: Mapping[str, str]) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address or None
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        watched = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        #: send WATCHDOG=1 this often (half the watchdog period), or never
        self.watchdog_interval: Optional[float] = int(usec) / 2e6 if watched else None
        self._socket: Optional[socket.socket] = None

    def send(self, *fields: str) -> None:
        if self.address is None:
            return
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            log.warning("cannot notify systemd at %s: %s", self.address.replace("\0", "@"), exc)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
