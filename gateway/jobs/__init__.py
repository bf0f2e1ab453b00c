"""Bulk jobs: many files predicted as one unit of work, durable across crashes (see ``store.py``)."""
