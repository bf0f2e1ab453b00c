"""Palm Serve's Python client: submit images, follow jobs, download verified results.

::

    from palm_serve import Client

    with Client("http://127.0.0.1:8000", api_key="...") as client:
        boxes = client.predict("scene.tif", format="geojson")
        job = client.jobs.create("scenes/", name="north coast")
        job.wait(progress=True)
        job.results("results.json")

Needs only httpx (tqdm, when installed, draws the progress bar); never imports the server.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from palm_serve.client import DEFAULT_URL, AsyncClient, AsyncJob, AsyncJobs, Client, Job, Jobs
    from palm_serve.errors import (
        BadRequest,
        Conflict,
        Forbidden,
        IntegrityError,
        NotFound,
        PalmServeError,
        ProblemError,
        RateLimited,
        ServerError,
        ServiceUnreachable,
        Unauthorized,
        Unavailable,
    )
    from palm_serve.progress import Progress, ProgressDisplay

_HOMES = {
    **dict.fromkeys(
        ("DEFAULT_URL", "AsyncClient", "AsyncJob", "AsyncJobs", "Client", "Job", "Jobs"), "client"
    ),
    **dict.fromkeys(("Progress", "ProgressDisplay"), "progress"),
}


def __getattr__(name: str) -> Any:
    """Names load on first use, so ``palm-serve predict`` does not pay for httpx."""
    if name in __all__:
        module = importlib.import_module(f"palm_serve.{_HOMES.get(name, 'errors')}")
        return getattr(module, name)
    raise AttributeError(f"module 'palm_serve' has no attribute {name!r}")


__all__ = [
    "DEFAULT_URL",
    "AsyncClient",
    "AsyncJob",
    "AsyncJobs",
    "BadRequest",
    "Client",
    "Conflict",
    "Forbidden",
    "IntegrityError",
    "Job",
    "Jobs",
    "NotFound",
    "PalmServeError",
    "ProblemError",
    "Progress",
    "ProgressDisplay",
    "RateLimited",
    "ServerError",
    "ServiceUnreachable",
    "Unauthorized",
    "Unavailable",
]
