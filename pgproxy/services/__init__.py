"""The daemon's services around the pooling core: the composition root and life cycle
(``daemon``), the pool registry with budgets and admission, credentials, the console's
control verbs and the console itself (``admin``), listeners, /metrics and health, and
workers. Nothing here is imported by ``pgproxy.core`` or ``pgproxy.protocol``."""
