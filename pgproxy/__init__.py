__version__ = "0.1.0"

# How this pgproxy was built: "pure" Python for now. A compiled build would say so here, the
# one place pgproxy_build_info{build} reads it from.
BUILD = "pure"

# The console's SHOW VERSION and the first line of `pgproxy --version`: PgBouncer's form,
# so that tools parsing "PgBouncer X.Y.Z" (pgbouncer_exporter) find the version they speak.
COMPATIBLE_WITH = "PgBouncer 1.25.2"
VERSION_LINE = f"{COMPATIBLE_WITH} (pgproxy {__version__})"
