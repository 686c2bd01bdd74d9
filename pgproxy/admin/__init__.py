"""The admin console: PgBouncer's SHOW and control commands over the simple query protocol."""

# The pseudo-databases that reach the console: PgBouncer's name, and ours.
CONSOLE_DATABASES = frozenset({"pgbouncer", "pgproxy"})
