"""Who is calling: API keys (hashed in the database), the tenant each belongs to, and its scopes.

::

    principal.py      Scope, Principal, the errors 401 (NotAuthenticated) and 403 (ScopeMissing)
    keys.py           the key format palm_<id>_<secret> and KeyStore (create, list, revoke, look up)
    authenticator.py  headers to a Principal; open_auth for the app; the loopback-only rule for "off"
    dependency.py     the FastAPI dependencies that yield a Principal holding a scope
    tenants.py        per-tenant limits (active jobs, files per job, storage) and their errors
"""
