"""The job database: engine (SQLite in WAL mode by default, PostgreSQL at scale), tables, migrations."""
