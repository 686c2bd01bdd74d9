"""PostgreSQL wire protocol v3, sans-I/O: plain code over bytes that tests drive directly.

Nothing in this package owns a socket or an event loop, and nothing in it imports the rest
of pgproxy; ``pgproxy.core``'s client and server connections move the bytes and call into it.
"""
