"""The pooling core: client and server connections, the pools that link them, and the
janitor's maintenance pass. It builds on ``pgproxy.protocol`` and imports nothing from
``pgproxy.services``: what it needs of the daemon around it, it declares as
``typing.Protocol`` interfaces (``ClientHost``, ``ServerOwner``, ``LinkedClient``)."""
