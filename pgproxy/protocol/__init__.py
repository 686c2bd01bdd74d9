"""PostgreSQL wire protocol v3, sans-I/O: plain code over bytes that tests drive directly.

Nothing in this package owns a socket or an event loop; ``client.py`` and ``server.py`` move
the bytes and call into it.
"""
