"""The gateway's exception tree (its problem+json rendering is ``gateway/api/problems.py``).

::

    GatewayError                         500  something we did not anticipate
    ├── InputError                       400  the request itself is wrong
    │   ├── InvalidParameter             422  a query/form parameter is out of range
    │   ├── UnsupportedMediaType         415  not an image format we read (PNG named .tif, HTML, VRT)
    │   ├── CorruptRaster                422  the container is right but its content cannot be decoded
    │   ├── UnsupportedRaster            422  decodable, but not a layout we can turn into RGB
    │   ├── RasterTooLarge               413  a budget (pixels, bands, decoded bytes) is exceeded
    │   ├── ResolutionOutOfRange         422  the file's pixels are far coarser than the model can see
    │   ├── UploadTooLarge               413  the upload's byte size is over the cap
    │   ├── RequestTimeout               408  the client sent its body too slowly
    │   └── DecoderFailed                422  the decoder crashed, ran out of memory or time on this file
    ├── ClientClosedRequest              499  the client went away before the answer (nobody reads it)
    ├── TemporarilyUnavailable           503  retry later (Retry-After)
    │   ├── InferenceUnavailable         503  Triton unreachable or the model not ready
    │   │   └── InferenceTimeout         503  an inference call missed its deadline
    │   ├── DecoderLost                  503  a decode worker was killed from outside mid-file
    │   └── Overloaded                   503  too many requests in flight
    ├── InsufficientStorage              507  the disk for uploads or results is full, or its quota spent
    └── InferenceError                   502  Triton answered with an error

Domain code raises these; third-party errors are translated at their module boundary with ``from exc``.
Each class carries its HTTP status, a stable ``type`` slug and a title; the instance carries the detail
(the reason a user can act on) and optional extension members, and says whether trying the same work
again may succeed (:attr:`GatewayError.retryable`: the server's state, not the input, was at fault).
"""

from __future__ import annotations

from typing import Any, ClassVar

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://palm-serve.dev/problems/"


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""

    status: ClassVar[int] = 500
    slug: ClassVar[str] = "internal-error"
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str, **extensions: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extensions = extensions

    def headers(self) -> dict[str, str]:
        return {}

    @property
    def retryable(self) -> bool:
        """Whether the same request may succeed later (a server-side condition, not the input)."""
        return False


class InputError(GatewayError):
    status = 400
    slug = "bad-request"
    title = "Bad request"


class InvalidParameter(InputError):
    status = 422
    slug = "invalid-parameter"
    title = "Invalid parameter"


class UnsupportedMediaType(InputError):
    status = 415
    slug = "unsupported-media-type"
    title = "Unsupported media type"


class CorruptRaster(InputError):
    status = 422
    slug = "corrupt-raster"
    title = "Corrupt raster"


class UnsupportedRaster(InputError):
    status = 422
    slug = "unsupported-raster"
    title = "Unsupported raster layout"


class RasterTooLarge(InputError):
    status = 413
    slug = "raster-too-large"
    title = "Raster exceeds a size budget"


class ResolutionOutOfRange(InputError):
    """The file's ground sample distance is beyond what the model can see (see
    :mod:`gateway.pipeline.resolution`); ``resample=off`` runs it anyway."""

    status = 422
    slug = "resolution-out-of-range"
    title = "Ground sample distance outside the model's range"


class UploadTooLarge(InputError):
    status = 413
    slug = "upload-too-large"
    title = "Upload too large"


class RequestTimeout(InputError):
    status = 408
    slug = "request-timeout"
    title = "Request body too slow"


class DecoderFailed(InputError):
    status = 422
    slug = "decoder-failed"
    title = "Decoding this file failed"

    @property
    def retryable(self) -> bool:
        """A file that ran out of its time budget may fit on a less busy server; a crash will recur."""
        return self.extensions.get("cause") == "timeout"


class ClientClosedRequest(GatewayError):
    """The client closed the connection before the response (nginx's 499); nobody reads the answer."""

    status = 499
    slug = "client-closed-request"
    title = "Client closed the request"


class TemporarilyUnavailable(GatewayError):
    """A 503 the client should retry: carries ``Retry-After``."""

    status = 503
    slug = "unavailable"
    title = "Temporarily unavailable"
    default_retry_after_s: ClassVar[int] = 5

    def __init__(self, detail: str, retry_after_s: int | None = None, **extensions: Any) -> None:
        super().__init__(detail, **extensions)
        self.retry_after_s = self.default_retry_after_s if retry_after_s is None else retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}

    @property
    def retryable(self) -> bool:
        return True


class InferenceUnavailable(TemporarilyUnavailable):
    slug = "inference-unavailable"
    title = "Inference server unavailable"


class InferenceTimeout(InferenceUnavailable):
    slug = "inference-timeout"
    title = "Inference timed out"


class DecoderLost(TemporarilyUnavailable):
    """A decode worker died of a signal sent from outside (SIGKILL, SIGTERM) while reading a file.

    Nothing says the file was the cause (an operator, a supervisor or the kernel's OOM killer picked the
    process); the same file is tried once more on a fresh worker before it is blamed.
    """

    slug = "decoder-lost"
    title = "Decoder lost"
    default_retry_after_s = 1


class InsufficientStorage(GatewayError):
    """A write failed for lack of space (``ENOSPC``) or of quota (``EDQUOT``)."""

    status = 507
    slug = "insufficient-storage"
    title = "Insufficient storage"

    @property
    def retryable(self) -> bool:
        return True


class InferenceError(GatewayError):
    status = 502
    slug = "inference-error"
    title = "Inference server error"

    @property
    def retryable(self) -> bool:
        return True


class Overloaded(TemporarilyUnavailable):
    slug = "overloaded"
    title = "Server busy"
    default_retry_after_s = 2
