"""Job webhooks: signed events, written to an outbox with the job's state and delivered with retries.

::

    events.py      event types and which a job may subscribe to
    signing.py     Standard Webhooks signatures (whsec_ secrets, v1 HMAC-SHA256, several while rotating)
    ssrf.py        the URL guard: http(s) only, every resolved address checked, the checked one pinned
    delivery.py    one POST to a checked address (no redirects, a deadline, a capped response)
    outbox.py      the outbox table: enqueue in the job's transaction, leases, attempts, redelivery
    dispatcher.py  the loop in each service process that delivers due events and schedules retries
"""
