"""Cancel keys: what pgproxy gives clients in BackendKeyData, and where a CancelRequest goes.

A key's process id carries the ``peer_id`` of the pgproxy that issued it and how many times
the request has been forwarded, PgBouncer 1.19's idea: in a group of pgproxy processes
behind one port (``so_reuseport``) or one load balancer, a CancelRequest that reaches the
wrong process is forwarded to the one that issued the key (``[peers]``), at most three
times. The 4-byte secret is random; with the 16 random bits below, 48 bits are unguessable.

    bits 31-30: forwards so far    bits 29-16: peer_id    bits 15-0: random
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from typing import Final

MAX_FORWARDS: Final = 3
_PEER_SHIFT: Final = 16
_PEER_MASK: Final = 0x3FFF
_FORWARD_SHIFT: Final = 30
_KEY_BITS: Final = (1 << _FORWARD_SHIFT) - 1  # the key without its forward count


# Random bytes for keys, read from the system's CSPRNG 4 KiB at a time: one getrandom call
# per 680 logins rather than two per login. Dropped in a forked child (a worker), which
# must not hand out its parent's keys.
_KEY_BYTES: Final = 6  # 2 for the process id's random bits, 4 for the secret
_BATCH: Final = 4096 // _KEY_BYTES * _KEY_BYTES


class _RandomBytes:
    """A batch of random bytes and how many are used (native fields when compiled)."""

    def __init__(self) -> None:
        self.batch = b""
        self.used = 0


_random: Final = _RandomBytes()


def _forget_random() -> None:
    _random.batch, _random.used = b"", 0


os.register_at_fork(after_in_child=_forget_random)


def new_key(peer_id: int) -> bytes:
    """A fresh key issued by the process ``peer_id``: its process id (int32, big-endian)
    and its secret, as BackendKeyData and CancelRequest carry them. Bytes rather than a
    (process id, secret) pair: compiled, a tuple of an int and bytes is a C struct, boxed
    into a new tuple object (and its hash computed) at every use as a dictionary key."""
    if _random.used >= len(_random.batch):
        _random.batch, _random.used = secrets.token_bytes(_BATCH), 0
    batch, at = _random.batch, _random.used
    _random.used = at + _KEY_BYTES
    # The process id's top 16 bits are the forward count (0) and peer_id, its low 16
    # random; the 4 random bytes after them are the secret.
    return peer_id.to_bytes(2, "big") + batch[at : at + _KEY_BYTES]


def key_of(process_id: int, secret: bytes) -> bytes:
    """The key (as new_key makes them) that a CancelRequest with these carries (its
    process id read unsigned, as pgproxy.protocol.startup reads it)."""
    return (process_id & 0xFFFFFFFF).to_bytes(4, "big") + secret


@dataclass(frozen=True, slots=True)
class Route:
    """Where a CancelRequest goes: ``peer`` None means here, under ``process_id``; else to
    that peer with ``process_id`` (its forward count raised)."""

    process_id: int
    peer: int | None


def route(process_id: int, own_peer_id: int) -> Route | None:
    """Where a CancelRequest with ``process_id`` goes from the process ``own_peer_id``;
    None when it goes nowhere (forwarded too often)."""
    key = process_id & _KEY_BITS
    issuer = (key >> _PEER_SHIFT) & _PEER_MASK
    if issuer == own_peer_id:
        return Route(key, None)
    forwards = process_id >> _FORWARD_SHIFT
    if forwards >= MAX_FORWARDS:
        return None
    return Route(key | ((forwards + 1) << _FORWARD_SHIFT), issuer)
