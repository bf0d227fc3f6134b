"""Alembic revisions of listsync (shipped in the wheel as listsync.migrations)."""
