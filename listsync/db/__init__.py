"""The SQL sync state: typed ORM models, engine/session setup and the repository of queries."""
