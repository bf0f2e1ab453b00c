"""Where uploads and results live: a small interface, a local directory behind it for now.

Keys are relative, ``/``-separated names (``jobs/<id>/uploads/000001``); nothing outside the storage
root is ever reachable through a key. The job engine reads a file through :meth:`Storage.local_path`
(the decoder needs a local file) and writes results through :meth:`Storage.result_path` followed by an
atomic rename, so a reader never sees half a result.
"""

from gateway.storage.local import LocalStorage, Storage

__all__ = ["LocalStorage", "Storage"]
