"""Engine helpers that keep data apart and secrets out of sight: `redact` (no password of a
DSN survives into an error text or a log line, in URL or keyword form) and the Redis names of
(db, table, key) (two different triples never share a name, whatever text they hold)."""

from __future__ import annotations

from urllib.parse import quote

from hypothesis import assume, given
from hypothesis import strategies as st

from meshd.store.engines.base import redact, where
from meshd.store.engines.redis import name

PASSWORDS = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zs")), min_size=8,
                    max_size=40)
# what a redacted message shows besides the password
SKELETON = ("could not connect (host=db1 user=app password=<password> dbname=x) "
            "(postgresql://db1/x?sslmode=require&password=<password>) <credentials>")


@given(PASSWORDS)
def test_a_url_password_never_survives_redaction(password):
    dsn = f"postgresql://app:{quote(password, safe='')}@db1:5432/orders"
    for text in (f"connection to {dsn} failed", f"error: {dsn}; retrying",
                 f"redis://:{quote(password, safe='')}@cache:6379/0 refused"):
        shown = redact(text)
        assert quote(password, safe="") not in shown and "<credentials>@" in shown
    assert redact(f"at {dsn}", dsn) == "at <dsn>"


@given(PASSWORDS)
def test_a_keyword_password_never_survives_redaction(password):
    # a password such as "postgres" or "password" is in the text around it anyway
    assume(password not in SKELETON and quote(password, safe="") not in SKELETON)
    quoted = "'" + password.replace("\\", "\\\\").replace("'", "\\'") + "'"
    for form in (f"host=db1 user=app password={quoted} dbname=x",
                 f"host=db1 password = {quoted}",
                 f"postgresql://db1/x?sslmode=require&password={quote(password, safe='')}"):
        shown = redact(f"could not connect ({form})")
        assert password not in shown and quote(password, safe="") not in shown, shown
        assert "<password>" in shown or "<credentials>" in shown


def test_where_shows_host_port_and_database_only():
    assert where("postgresql://app:pw@db1:5432/orders") == "postgresql://db1:5432/orders"
    assert where("redis://:pw@cache:6379/2") == "redis://cache:6379/2"
    assert where("redis://cache:6379/0") == "redis://cache:6379/0"


TEXT = st.text(max_size=12)


@given(st.tuples(TEXT, TEXT, TEXT), st.tuples(TEXT, TEXT, TEXT))
def test_redis_names_of_different_keys_differ(one, two):
    if one != two:
        assert name("v", *one) != name("v", *two)


@given(TEXT, TEXT)
def test_names_of_a_table_never_equal_names_of_a_key(db, tbl):
    # the index of table (db, tbl) and a key's value hash differ by kind letter and arity
    assert name("i", db, tbl) != name("v", db, tbl, "")
    assert name("v", db, tbl).startswith(b"meshd:v:")


def test_separators_in_parts_cannot_make_two_names_collide():
    assert name("v", "a:b", "c", "d") != name("v", "a", "b:c", "d")
    assert name("v", "1:a", "", "") != name("v", "", "1:a", "")
    assert name("v", "ü", "x", "y") == b"meshd:v:2:\xc3\xbc1:x1:y"


def test_a_quoted_keyword_password_with_spaces_is_redacted_whole():
    shown = redact(r"could not connect (host=db1 password='two words \' here' dbname=x)")
    assert shown == "could not connect (host=db1 password=<password> dbname=x)"


@given(st.text(max_size=20), st.text(max_size=20), st.text(max_size=20))
def test_the_script_keys_are_the_documented_names(db, tbl, key):
    """The hot path builds a key's five names from a cached (db, table) part: they are
    exactly the names `name` documents (a mismatch would split one record in two)."""
    from meshd.store.engines.redis import RedisEngine

    keys = RedisEngine._keys(None, db, tbl, key)  # type: ignore[arg-type]
    assert keys == [name("v", db, tbl, key), name("n", db, tbl), name("s", db, tbl, key),
                    name("i", db, tbl), name("t", db)]
