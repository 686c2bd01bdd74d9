"""Builds pgproxy with its hot modules compiled by mypyc, or as pure Python.

The modules are listed once, in ``pgproxy/compiled.py`` (``HOT_MODULES``). The build is
pure Python when the environment has ``PURE_PGPROXY=1``, or when no working C compiler
(with Python's headers) is found; it says which on stderr. Everything else about the
package is in pyproject.toml. (Not a PGPROXY_* variable: those are pgproxy's settings, and
it stops at an unknown one.)
"""

from __future__ import annotations

import ast
import os
import sys
import tempfile
from pathlib import Path

from setuptools import Extension, setup

ROOT = Path(__file__).resolve().parent
# The setup.py commands that build extension modules (pip runs bdist_wheel or
# editable_wheel); the others (egg_info, dist_info, sdist) only need the metadata.
BUILDS = {"build", "build_ext", "bdist_wheel", "bdist", "install", "develop", "editable_wheel"}


def say(message: str) -> None:
    print(f"pgproxy build: {message}", file=sys.stderr)


def hot_modules() -> list[str]:
    """HOT_MODULES from pgproxy/compiled.py, read without importing pgproxy."""
    tree = ast.parse((ROOT / "pgproxy" / "compiled.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "HOT_MODULES" for target in node.targets
        ):
            return list(ast.literal_eval(node.value))
    raise SystemExit("pgproxy/compiled.py has no HOT_MODULES")


def compiler_works() -> bool:
    """Whether a C compiler here can build against Python's headers (a one-line probe)."""
    from setuptools._distutils import ccompiler, sysconfig

    compiler = ccompiler.new_compiler()
    sysconfig.customize_compiler(compiler)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "probe.c"
        source.write_text("#include <Python.h>\nint probe(void) { return 0; }\n")
        try:
            compiler.compile(
                [str(source)], output_dir=tmp, include_dirs=[sysconfig.get_python_inc()]
            )
        except Exception:  # any failure (the error classes moved between setuptools versions)
            return False
    return True


def extensions() -> list[Extension]:
    if not BUILDS.intersection(sys.argv[1:]):
        return []  # metadata only (pip asks for it first): no need to run mypyc for that
    if "editable_wheel" in sys.argv[1:]:
        # Extension modules beside the .py files would win the import and run stale code
        # after every edit: an editable (development) install is always pure.
        say("pure Python (editable install)")
        return []
    if os.environ.get("PURE_PGPROXY", "") not in ("", "0"):
        say("pure Python (PURE_PGPROXY is set)")
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        say("pure Python (mypyc is not installed)")
        return []
    if not compiler_works():
        say("pure Python (no working C compiler with Python's headers found)")
        return []
    paths = [str(Path(*name.split(".")).with_suffix(".py")) for name in hot_modules()]
    say(f"compiling {len(paths)} modules with mypyc: {', '.join(paths)}")
    return mypycify(paths, opt_level="3", debug_level="0", group_name="pgproxy")


setup(ext_modules=extensions())
