"""The admin console: PgBouncer's SHOW and control commands over the simple query protocol."""

# The pseudo-databases that reach the console: PgBouncer's name, and ours.
CONSOLE_DATABASES = frozenset({"pgbouncer", "pgproxy"})
CONSOLE_DATABASE = "pgbouncer"  # the name its clients are counted and shown under
