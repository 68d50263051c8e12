"""Shared fixtures for the checks of the built book (``pytest -m book tests``).

These tests run after ``jupyter-book build .``: they read ``_build/html``. When the build is missing they
fail with a message saying how to build it; they never skip, so that ``make test`` cannot pass without a
book. Every page listed in ``_toc.yml`` becomes one parameter ``page`` of the tests that ask for it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from bookpages import HTML, Page, toc_pages


def pytest_generate_tests(metafunc):
    if "page" in metafunc.fixturenames:
        pages = toc_pages()
        metafunc.parametrize("page", pages, ids=[p.docname for p in pages])


@pytest.fixture(scope="session")
def html_dir() -> Path:
    """The built HTML folder. Each test calls ``require_build()`` itself, so that a missing build is a test
    failure rather than a fixture error."""
    return HTML


@pytest.fixture(scope="session")
def pages() -> list[Page]:
    return toc_pages()
