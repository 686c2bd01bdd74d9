"""Cancel keys carry their issuer's peer_id and a forward count (pgproxy/cancel.py)."""

from __future__ import annotations

from pgproxy.cancel import MAX_FORWARDS, Route, new_key, route


def test_a_key_routes_home() -> None:
    for peer_id in (0, 1, 77, 16383):
        for _ in range(50):
            process_id, secret = new_key(peer_id)
            assert 0 <= process_id < 2**30 and len(secret) == 4
            assert route(process_id, peer_id) == Route(process_id, None)


def test_another_peer_s_key_is_forwarded_at_most_three_times() -> None:
    process_id, _ = new_key(5)
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
