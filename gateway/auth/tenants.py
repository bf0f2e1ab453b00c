"""What one tenant may hold at once: jobs queued or running, files in a job, bytes stored.

Defaults come from ``PALM_TENANTS__*`` (files per job from ``PALM_JOBS__MAX_FILES_PER_JOB``), and
``PALM_TENANTS__LIMITS`` overrides them per tenant. Storage counts the uploads still kept and the
results of the tenant's jobs.
"""

from __future__ import annotations

from dataclasses import dataclass

from gateway.errors import GatewayError
from gateway.settings import Settings

RETRY_AFTER_S = 30


@dataclass(frozen=True, slots=True)
class TenantLimits:
    max_active_jobs: int
    max_files_per_job: int
    max_storage_bytes: int


def limits_for(tenant: str, settings: Settings) -> TenantLimits:
    defaults = settings.tenants
    override = defaults.limits.get(tenant)
    return TenantLimits(
        max_active_jobs=(override and override.max_active_jobs) or defaults.max_active_jobs,
        max_files_per_job=(override and override.max_files_per_job) or settings.jobs.max_files_per_job,
        max_storage_bytes=(override and override.max_storage_bytes) or defaults.max_storage_bytes,
    )


class TenantLimitReached(GatewayError):
    """The tenant has as many jobs queued or running as it may; one must end first."""

    status = 429
    slug = "tenant-limit-reached"
    title = "Too many jobs at once"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(RETRY_AFTER_S)}

    @property
    def retryable(self) -> bool:
        return True


class TenantQuotaExceeded(GatewayError):
    """The request would take the tenant past its files-per-job or storage budget."""

    status = 413
    slug = "tenant-quota-exceeded"
    title = "Tenant quota exceeded"
