"""Job requests turned into stored jobs: uploads streamed to storage, each file checked by its bytes.

The HTTP routes (``gateway/api/jobs.py``) stay thin: they hand the request's body and form fields here.
A file whose first bytes are not a raster we read (or not what its name says) is recorded as failed at
once, with the problem ``/v1/predict`` would give, and its bytes are not kept; the other files of the
request are unaffected.

A webhook URL is checked by the SSRF guard (:mod:`gateway.webhooks.ssrf`) and its secret by the signer
before the job exists; the tenant's limits (:mod:`gateway.auth.tenants`) are checked before the upload
streams and again in the transaction that creates the job.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import unicodedata
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.auth.tenants import TenantLimitReached, TenantLimits, TenantQuotaExceeded, limits_for
from gateway.db.engine import Database
from gateway.errors import GatewayError, InputError, InvalidParameter, UploadTooLarge
from gateway.jobs.models import JobPriority
from gateway.jobs.store import JobConflict, JobStore, NewFile, new_job_id
from gateway.options import PredictOptions
from gateway.pipeline.contract import ModelContract
from gateway.pipeline.raster.sniff import allowed_driver, drivers_for_name
from gateway.pipeline.result import ModelInfo
from gateway.pipeline.tiling import choose_overlap
from gateway.settings import Settings
from gateway.storage import Storage
from gateway.uploads import FORM_OVERHEAD_BYTES, Form, FormLimits, Upload, discard, receive_form
from gateway.webhooks.events import parse_subscriptions
from gateway.webhooks.signing import parse_secret
from gateway.webhooks.ssrf import UrlGuard

logger = logging.getLogger(__name__)

FILES_FIELD = "files"
FIELDS = (
    "score_threshold",
    "bands",
    "resample",
    "gsd",
    "webhook_url",
    "webhook_secret",
    "webhook_events",
    "name",
    "priority",
)
_HIDDEN = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def job_file_name(raw: str | None) -> str:
    """A client's file name kept with its folders (``north/a.tif``), harmless: no ``..``, no empty or
    hidden-character segments, ``/``-separated, at most 1,024 characters."""
    text = unicodedata.normalize("NFC", (raw or "").replace("\\", "/"))
    segments = []
    for segment in text.split("/"):
        clean = "".join(ch for ch in segment if unicodedata.category(ch) not in _HIDDEN).strip()
        if clean and clean not in (".", ".."):
            segments.append(clean[:255])
    return "/".join(segments)[-1024:] or "upload"


@dataclass(frozen=True, slots=True)
class JobParameters:
    """What a job's creator chose; stored with the job and applied to every file."""

    name: str
    priority: JobPriority
    score_threshold: float | None
    bands: str | None
    webhook_url: str | None
    webhook_secret: str | None
    webhook_events: tuple[str, ...] = ()
    resample: str | None = None
    gsd: float | None = None

    @classmethod
    def parse(cls, fields: dict[str, Any], settings: Settings) -> JobParameters:
        """Check the fields as ``/v1/predict`` checks its parameters.

        Raises:
            InvalidParameter: naming the field.
        """
        unknown = sorted(set(fields) - set(FIELDS))
        if unknown:
            raise InvalidParameter(
                f"unknown field {', '.join(map(repr, unknown))}; a job takes: {', '.join(FIELDS)}",
                unknown=unknown,
            )
        threshold = _number(fields.get("score_threshold"), "score_threshold")
        bands = _text(fields.get("bands"))
        resample = _text(fields.get("resample"))
        gsd = _number(fields.get("gsd"), "gsd")
        options = PredictOptions.parse(
            score_threshold=threshold,
            bands=bands,
            default_score_threshold=settings.tiling.score_threshold,
            max_pixels=None,
            resample=resample,
            gsd=gsd,
        )
        raw_priority = _text(fields.get("priority")) or JobPriority.normal.value
        try:
            priority = JobPriority(raw_priority)
        except ValueError:
            raise InvalidParameter(
                f"priority must be low, normal or high, got {raw_priority!r}", parameter="priority"
            ) from None
        name = _text(fields.get("name")) or ""
        if len(name) > 200:
            raise InvalidParameter("name is longer than 200 characters", parameter="name")
        url = _text(fields.get("webhook_url"))
        if url is not None and not re.match(r"^https?://", url, re.IGNORECASE):
            raise InvalidParameter("webhook_url must be an http or https URL", parameter="webhook_url")
        secret = _text(fields.get("webhook_secret"))
        if secret is not None:
            parse_secret(secret)
        raw_events = fields.get("webhook_events")
        subscribed = parse_subscriptions(raw_events if isinstance(raw_events, list) else _text(raw_events))
        if url is None and (secret is not None or subscribed):
            raise InvalidParameter(
                "webhook_secret and webhook_events need a webhook_url", parameter="webhook_url"
            )
        if url is not None and secret is None and not settings.webhook.signing_secrets():
            raise InvalidParameter(
                "webhook_url needs a webhook_secret (whsec_ and base64 of 24 to 64 random bytes): this "
                "server has no signing secret of its own (PALM_WEBHOOK__SECRETS)",
                parameter="webhook_secret",
            )
        return cls(
            name,
            priority,
            threshold,
            bands,
            url,
            secret,
            tuple(subscribed),
            resample=options.resample.value,
            gsd=options.gsd_m,
        )

    def stored(self, settings: Settings, contract: ModelContract) -> dict[str, Any]:
        """The parameters recorded with the job (and reported in its resource); the tile side is the
        served model's."""
        return {
            "score_threshold": self.score_threshold
            if self.score_threshold is not None
            else settings.tiling.score_threshold,
            "bands": self.bands,
            "resample": self.resample,
            "gsd": self.gsd,
            "tile_size": contract.tile_size,
            "overlap": choose_overlap(contract.tile_size, settings.tiling.overlap),
            "nms_iou": settings.tiling.nms_iou,
        }


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _number(value: Any, name: str) -> float | None:
    text = _text(value)
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        raise InvalidParameter(f"{name} must be a number, got {text!r}", parameter=name) from None


class JobService:
    """Creates jobs and adds files to them (see the module docstring)."""

    def __init__(
        self,
        store: JobStore,
        db: Database,
        storage: Storage,
        model: ModelInfo,
        settings: Settings,
        guard: UrlGuard | None = None,
    ) -> None:
        self.store = store
        self.db = db
        self.storage = storage
        self.model = model
        self.settings = settings
        self.guard = guard if guard is not None else UrlGuard(allow_private=settings.webhook.allow_private)

    async def _parameters(self, fields: dict[str, Any]) -> JobParameters:
        parameters = JobParameters.parse(fields, self.settings)
        if parameters.webhook_url is not None:
            await self.guard.check(parameters.webhook_url)
        return parameters

    async def _admit(self, tenant: str, *, start: bool) -> tuple[TenantLimits, int]:
        """The tenant's limits and the bytes it may still store, refusing at once what cannot fit."""
        limits = limits_for(tenant, self.settings)
        usage = await self.db.run(self.store.tenant_usage, tenant)
        if start and usage.active_jobs >= limits.max_active_jobs:
            raise TenantLimitReached(
                f"tenant {tenant!r} has {usage.active_jobs} jobs queued or running, its limit; retry once "
                "one has ended",
                limit=limits.max_active_jobs,
            )
        room = limits.max_storage_bytes - usage.storage_bytes
        if room <= 0:
            raise TenantQuotaExceeded(
                f"tenant {tenant!r} stores {usage.storage_bytes} bytes, its limit; delete ended jobs to "
                "make room",
                limit=limits.max_storage_bytes,
            )
        return limits, room

    def _form_limits(self, room: int, *, fields: bool = True) -> FormLimits:
        limits = self.form_limits()
        return FormLimits(
            file_field=limits.file_field,
            max_files=limits.max_files,
            max_file_bytes=limits.max_file_bytes,
            max_total_bytes=min(limits.max_total_bytes, room + FORM_OVERHEAD_BYTES),
            max_fields=limits.max_fields if fields else 0,
            too_many_files=limits.too_many_files,
        )

    def form_limits(self) -> FormLimits:
        jobs = self.settings.jobs
        return FormLimits(
            file_field=FILES_FIELD,
            max_files=jobs.max_files_per_request,
            max_file_bytes=self.settings.limits.max_upload_bytes,
            max_total_bytes=jobs.max_request_bytes,
            max_fields=len(FIELDS),
            too_many_files=(
                "send larger batches as a staged job: POST /v1/jobs with JSON, then POST "
                "/v1/jobs/{id}/files several times, then POST /v1/jobs/{id}/start"
            ),
        )

    async def create_with_files(
        self,
        *,
        tenant: str,
        content_type: str | None,
        content_length: str | None,
        body: AsyncIterator[bytes],
        idempotency_key: str | None,
    ) -> tuple[dict[str, Any], bool]:
        """A job from one multipart request with ``files`` parts; started at once."""
        job_id = new_job_id()
        names: set[str] = set()
        limits, room = await self._admit(tenant, start=True)
        form = await self._receive(
            tenant,
            room,
            content_type,
            content_length,
            body,
            self._form_limits(room),
            check_name=lambda raw: _unique(job_file_name(raw), names),
        )
        uploads = list(form.files)
        try:
            if not uploads:
                raise InputError(f"the form has no part named {FILES_FIELD!r}; send files as -F files=@a.tif")
            parameters = await self._parameters(form.fields)
            fingerprint = _fingerprint(form.fields, uploads)
            new_files = await self.db.run(self._store_files, job_id, uploads)
        except BaseException:
            for upload in uploads:
                discard(upload)
            raise
        try:
            job, created = await self.db.run(
                self.store.create_job,
                job_id=job_id,
                tenant=tenant,
                name=parameters.name,
                priority=parameters.priority,
                parameters=parameters.stored(self.settings, self.model.contract),
                model=self._model(),
                new_files=new_files,
                start=True,
                idempotency_key=idempotency_key,
                request_sha256=fingerprint,
                webhook_url=parameters.webhook_url,
                webhook_secret=parameters.webhook_secret,
                webhook_events=parameters.webhook_events,
                limits=limits,
            )
        except BaseException:
            await self.db.run(self.storage.delete_prefix, f"jobs/{job_id}")
            raise
        if not created:
            await self.db.run(self.storage.delete_prefix, f"jobs/{job_id}")
        return job, created

    async def create_staged(
        self, *, tenant: str, fields: dict[str, Any], idempotency_key: str | None
    ) -> dict[str, Any]:
        """A job in ``created``, to receive files over several requests."""
        parameters = await self._parameters(fields)
        job, _ = await self.db.run(
            self.store.create_job,
            job_id=new_job_id(),
            tenant=tenant,
            name=parameters.name,
            priority=parameters.priority,
            parameters=parameters.stored(self.settings, self.model.contract),
            model=self._model(),
            new_files=[],
            start=False,
            idempotency_key=idempotency_key,
            request_sha256=hashlib.sha256(orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)).hexdigest(),
            webhook_url=parameters.webhook_url,
            webhook_secret=parameters.webhook_secret,
            webhook_events=parameters.webhook_events,
            limits=limits_for(tenant, self.settings),
        )
        return job

    async def add_files(
        self,
        *,
        job_id: str,
        tenant: str,
        content_type: str | None,
        content_length: str | None,
        body: AsyncIterator[bytes],
    ) -> dict[str, Any]:
        """Files for a job in ``created``; a name the job already has is refused (409)."""
        taken = await self.db.run(self.store.existing_names, job_id, tenant)
        limits, room = await self._admit(tenant, start=False)
        names: set[str] = set()

        def check(raw: str) -> None:
            name = job_file_name(raw)
            if name in taken:
                raise JobConflict(f"the job already has a file named {name!r}", name=name)
            _unique(name, names)

        form = await self._receive(
            tenant, room, content_type, content_length, body, self._form_limits(room, fields=False), check
        )
        uploads = list(form.files)
        try:
            if not uploads:
                raise InputError(f"the form has no part named {FILES_FIELD!r}")
            new_files = await self.db.run(self._store_files, job_id, uploads)
        except BaseException:
            for upload in uploads:
                discard(upload)
            raise
        try:
            return await self.db.run(self.store.add_files, job_id, tenant, new_files, limits)
        except BaseException:
            for new in new_files:
                if new.storage_key is not None:
                    await self.db.run(self.storage.delete, new.storage_key)
            raise

    async def _receive(
        self,
        tenant: str,
        room: int,
        content_type: str | None,
        content_length: str | None,
        body: AsyncIterator[bytes],
        limits: FormLimits,
        check_name: Callable[[str], None],
    ) -> Form:
        """The multipart form, its files staged; a body past the tenant's storage room is refused as
        the tenant's quota, not as the endpoint's size cap."""
        try:
            return await receive_form(
                content_type,
                content_length,
                body,
                self.storage.staging_dir(),
                limits,
                sha256=True,
                check_name=check_name,
                rename=job_file_name,
            )
        except UploadTooLarge as exc:
            if exc.extensions.get("limit_bytes") == room + FORM_OVERHEAD_BYTES == limits.max_total_bytes:
                raise TenantQuotaExceeded(
                    f"tenant {tenant!r} may store {room} more bytes; this upload is larger (delete ended "
                    "jobs to make room)",
                    limit=room,
                ) from exc
            raise

    def _store_files(self, job_id: str, uploads: list[Upload]) -> list[NewFile]:
        """Move accepted uploads to their keys; refuse the others by their bytes (blocking)."""
        stored = []
        for upload in uploads:
            error: GatewayError | None = None
            if upload.size == 0:
                error = InputError("the uploaded file is empty")
            else:
                try:
                    allowed_driver(upload.head, drivers_for_name(upload.file_name))
                except GatewayError as refused:
                    error = refused
            if error is not None:
                discard(upload)
                stored.append(NewFile(upload.file_name, upload.size, upload.sha256, None, error))
                continue
            key = f"jobs/{job_id}/uploads/{secrets.token_hex(8)}"
            self.storage.put(key, upload.path)
            stored.append(NewFile(upload.file_name, upload.size, upload.sha256, key))
        return stored

    def _model(self) -> dict[str, str | None]:
        return {"name": self.model.name, "version": self.model.version, "sha256": self.model.sha256}


def _unique(name: str, seen: set[str]) -> None:
    if name in seen:
        raise JobConflict(
            f"the request sends two files named {name!r}; names must be unique in a job", name=name
        )
    seen.add(name)


def _fingerprint(fields: dict[str, str], uploads: list[Upload]) -> str:
    """What makes two job requests the same: their fields and their files' names and bytes (not the
    multipart boundary, which a client picks anew for each try)."""
    content = {"fields": fields, "files": [[u.file_name, u.sha256] for u in uploads]}
    return hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS)).hexdigest()
