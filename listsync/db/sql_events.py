"""The SQL source's events built in SQL: `sql_rows.EVENT_SHAPE` filled from a snapshot row's
columns, with the database's own JSON quoting, so an entering row never comes back to Python."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, Connection, Text, case, cast, func, literal

from listsync.db.session import is_postgres
from listsync.ingest import sql_rows


def filled(
    conn: Connection, parts: Sequence[str], t: Any, message_id: ColumnElement[Any], key: ColumnElement[Any]
) -> ColumnElement[Any]:
    """sql_rows.EVENT_SHAPE's parts (see `event_parts`) as one SQL text expression over a
    snapshot row (`t`: its columns, `key`: its audience's): its holes filled from the row, as
    the Python `sql_rows.Events` fills them."""
    quoted = _json_string(conn)
    holes: dict[str, ColumnElement[Any]] = {
        sql_rows.MESSAGE_ID: quoted(message_id),
        sql_rows.PROPERTIES: t.properties,
        sql_rows.KEY: quoted(key),
        sql_rows.FLAG: literal("true", Text),
        sql_rows.EMAIL: case(
            (t.email != "", literal(sql_rows.EMAIL_FIELD, Text) + quoted(t.email)), else_=literal("", Text)
        ),
        sql_rows.WHO: case(
            (t.user_id != "", literal(sql_rows.USER_ID_FIELD, Text) + quoted(t.user_id)),
            else_=literal(sql_rows.ANONYMOUS_ID_FIELD, Text)
            + quoted(literal(sql_rows.ANONYMOUS_PREFIX, Text) + t.email),
        ),
    }
    pieces: list[ColumnElement[Any]] = []
    text_run = ""
    for part in parts:
        if part not in sql_rows.HOLES:
            text_run += part
            continue
        if text_run:
            pieces.append(literal(text_run, Text))
            text_run = ""
        pieces.append(holes[part])
    if text_run:
        pieces.append(literal(text_run, Text))
    expression = pieces[0]
    for piece in pieces[1:]:
        expression = expression + piece
    return expression


def _json_string(conn: Connection) -> Any:
    """A text expression as a JSON string, in the database's own function."""
    if is_postgres(conn):
        return lambda value: cast(func.to_json(cast(value, Text)), Text)
    return lambda value: func.json_quote(value, type_=Text)
