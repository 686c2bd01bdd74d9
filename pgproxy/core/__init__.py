"""The pooling core: client and server connections, the pools that link them, and the
janitor's maintenance pass. It builds on ``pgproxy.protocol`` and imports nothing from
``pgproxy.services``: what it needs of the daemon around it, it declares as
a ``typing.Protocol`` (``ClientHost``). The server side sees its client and its pool
through base classes of theirs (``LinkedClient``, ``ServerOwner`` in ``core.server``):
compiled, those reach attributes through native slots."""
