from pgproxy.compiled import build_kind

__version__ = "0.1.0"

# How this pgproxy was built: "compiled" (its hot modules by mypyc), "pure" Python, or
# "partial"; pgproxy_build_info{build} and `pgproxy --version` read it here.
BUILD = build_kind()

# The console's SHOW VERSION and the first line of `pgproxy --version`: PgBouncer's form,
# so that tools parsing "PgBouncer X.Y.Z" (pgbouncer_exporter) find the version they speak.
COMPATIBLE_WITH = "PgBouncer 1.25.2"
VERSION_LINE = f"{COMPATIBLE_WITH} (pgproxy {__version__})"
