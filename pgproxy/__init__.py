__version__ = "0.1.0"

# The console's SHOW VERSION and the first line of `pgproxy --version`: PgBouncer's form,
# so that tools parsing "PgBouncer X.Y.Z" (pgbouncer_exporter) find the version they speak.
COMPATIBLE_WITH = "PgBouncer 1.25.2"
VERSION_LINE = f"{COMPATIBLE_WITH} (pgproxy {__version__})"
