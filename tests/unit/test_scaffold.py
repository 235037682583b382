"""`meshd new`'s files (meshd/scaffold.py): every kind fills every placeholder, its Python
parses, and bad names or kinds are refused before anything is made."""

from __future__ import annotations

import ast

import pytest

from meshd import scaffold
from meshd.errors import MeshError


@pytest.mark.parametrize("kind", scaffold.KINDS)
def test_every_kind_makes_a_whole_project(kind):
    files = scaffold.project("order-book", kind)
    assert {"pyproject.toml", ".gitignore", "README.md", "main.py", "order_book/__init__.py",
            "order_book/__main__.py", "order_book/service.py", "tests/__init__.py",
            "tests/test_order_book.py"} == set(files)
    for path, text in files.items():
        assert "{{" not in text and "}}" not in text.replace("}}\"", ""), path
        if path.endswith(".py"):
            ast.parse(text, path)  # it is Python
    assert 'name = "order-book"' in files["pyproject.toml"]
    assert 'dependencies = ["meshd"]' in files["pyproject.toml"]
    assert "from meshd_sdk.testing import mesh" in files["tests/test_order_book.py"]
    assert 'Service("order-book"' in files["order_book/service.py"]
    readme = files["README.md"]
    assert "python -m order_book" in readme and "pytest" in readme


def test_a_service_answers_on_its_titled_endpoint():
    files = scaffold.project("order-book")
    assert '@service.handler("OrderBook.Hello")' in files["order_book/service.py"]
    assert "meshd call order-book OrderBook.Hello" in files["README.md"]


@pytest.mark.parametrize("name", ["", "Orders", "1orders", "orders-", "or--ders", "or ders",
                                  "orders/../x", "a" * 41, "ordérs", "-x"])
def test_a_name_that_is_not_a_service_name_is_a_400(name):
    with pytest.raises(MeshError) as exc:
        scaffold.project(name)
    assert exc.value.status == 400 and "service name" in exc.value.detail


def test_an_unknown_kind_is_a_400():
    with pytest.raises(MeshError) as exc:
        scaffold.project("orders", "daemon")
    assert exc.value.status == 400 and "service, subscriber, web" in exc.value.detail


@pytest.mark.parametrize("name", ["tests", "json", "class", "trio", "meshd-sdk", "main"])
def test_a_name_whose_module_python_or_meshd_has_is_a_400(name):
    with pytest.raises(MeshError) as exc:
        scaffold.project(name)
    assert exc.value.status == 400 and "already has" in exc.value.detail
