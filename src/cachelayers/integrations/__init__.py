"""Integrations with frameworks users put cachelayers in; each module imports its framework, this one nothing.

* `cachelayers.integrations.fastapi`: `RateLimitExceeded` as HTTP 429 with ``Retry-After``, and an
  ``X-Cache`` header saying whether a request was answered from a cache (extra ``fastapi``).

Request-scoped parameters (``Request``, ``Response``, ``BackgroundTasks``, clients) are left out of keys by
`cachelayers.keys.ignore_type`, which needs no integration module.
"""

__all__: list[str] = []
