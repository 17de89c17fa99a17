"""The package as installed: where it was imported from, its metadata, its type stubs and docstrings.
Needs only the standard library (and mypy, when installed, for the stub check)."""

import os
from pathlib import Path

import posenc

PACKAGE = Path(posenc.__file__).resolve().parent


def test_imported_from_the_expected_place():
    """tests/python/installed.sh sets POSENC_EXPECT_INSTALLED to the virtual environment the package
    was installed into: the suite must then test that copy, not a build tree on PYTHONPATH."""
    venv = os.environ.get("POSENC_EXPECT_INSTALLED")
    if venv:
        assert PACKAGE.is_relative_to(Path(venv).resolve()), f"posenc imported from {PACKAGE}, not from {venv}"
        assert "site-packages" in PACKAGE.parts
    assert posenc.__version__.count(".") == 2
    assert (PACKAGE / "py.typed").is_file() and (PACKAGE / "__init__.pyi").is_file()
