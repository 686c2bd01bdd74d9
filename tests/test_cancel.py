"""Cancel keys carry their issuer's peer_id and a forward count (pgproxy/cancel.py)."""

from __future__ import annotations

import os

from pgproxy.cancel import MAX_FORWARDS, Route, key_of, new_key, route


def key_parts(key: bytes) -> tuple[int, bytes]:
    """A key's process id (unsigned) and secret."""
    return int.from_bytes(key[:4], "big"), key[4:]


def test_a_key_routes_home() -> None:
    for peer_id in (0, 1, 77, 16383):
        for _ in range(50):
            key = new_key(peer_id)
            process_id, secret = key_parts(key)
            assert 0 <= process_id < 2**30 and len(secret) == 4
            assert key_of(process_id, secret) == key
            assert route(process_id, peer_id) == Route(process_id, None)


def test_another_peer_s_key_is_forwarded_at_most_three_times() -> None:
    process_id, _ = key_parts(new_key(5))
    hops = []
    current = process_id
    for _ in range(MAX_FORWARDS + 1):
        step = route(current, 9)  # always reaching the wrong process
        if step is None:
            break
        assert step.peer == 5
        hops.append(step)
        current = step.process_id
    assert len(hops) == MAX_FORWARDS
    # Wherever it arrives, the issuer finds its own key under the forwarded id.
    assert route(hops[-1].process_id, 5) == Route(process_id, None)


def test_keys_are_random() -> None:
    keys = {new_key(1) for _ in range(1000)}
    assert len(keys) == 1000


def test_keys_stay_distinct_across_batches_of_random_bytes() -> None:
    # (The random bytes come in batches of 4 KiB: 682 keys each.)
    keys = [key_parts(new_key(3)) for _ in range(3000)]
    secrets = {secret for _, secret in keys}
    assert len(secrets) > 2990  # (4-byte secrets: a collision in 3000 is ~0.1% likely)
    assert len({pid & 0xFFFF for pid, _ in keys}) > 1000


def test_a_forked_child_draws_its_own_keys() -> None:
    new_key(0)  # the parent has random bytes in hand
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # (the child writes its next key and leaves at once)
        try:
            os.write(write_end, key_parts(new_key(0))[1])
        finally:
            os._exit(0)
    os.close(write_end)
    child_secret = os.read(read_end, 4)
    os.close(read_end)
    os.waitpid(child, 0)
    assert len(child_secret) == 4 and child_secret != key_parts(new_key(0))[1]
