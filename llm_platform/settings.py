"""Settings, all from the environment (see README for the variables)."""

from __future__ import annotations

import os
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from .env import database_from_url, env_bool, env_float, env_int, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent


def load_run_env(path: Path) -> bool:
    """While `bash scripts/run` is up, take the variables it chose (its embedded servers' URLs,
    its generated secret) from the file it writes, so that `manage.py` in another shell reaches
    the same servers. A variable set in the environment wins; a file whose run command has
    stopped (it removes the file) or died (its pid is gone) is ignored. True if it was read."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return False
    values = dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))
    pid = values.pop("GW_RUN_PID", "")
    if not pid.isdigit() or int(pid) <= 0:
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: is it alive?
    except PermissionError:
        pass  # alive, another user's
    except OSError:
        return False
    for name, value in values.items():
        if not os.environ.get(name):
            os.environ[name] = value
    return True


RUN_ENV_FILE = Path(os.environ.get("GW_DATA_DIR") or BASE_DIR / ".data").resolve() / "run.env"
load_run_env(RUN_ENV_FILE)

DEBUG = env_bool("DEBUG", False)
SECRET_KEY = env_str("SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY must be set when DEBUG is off. On a local checkout, keep `bash scripts/run` "
            "running: manage.py in another shell then takes SECRET_KEY and the embedded servers' "
            f"URLs from {RUN_ENV_FILE}. Elsewhere, set SECRET_KEY, DATABASE_URL and REDIS_URL."
        )
    SECRET_KEY = "insecure-development-only-secret-key"  # noqa: S105 - DEBUG only

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", "")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "channels",
    "tenants",
    "gateway",
    "billing",
]

MIDDLEWARE = [
    "gateway.api.middleware.RequestIdMiddleware",
    # Under /v1/, any error Django answers itself (400 bad Host, 403 CSRF, 404, 405, 500) in JSON.
    "gateway.api.middleware.ApiErrorShapeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "llm_platform.urls"
ASGI_APPLICATION = "llm_platform.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASE_URL = env_str("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/postgres")
DATABASES = {"default": database_from_url(DATABASE_URL)}
DATABASES["default"]["CONN_MAX_AGE"] = env_int("DB_CONN_MAX_AGE", 60)
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
# A PostgreSQL that is away or hung must not hold a request: libpq's connect timeout (seconds,
# 2 at least) and a server-side statement timeout (ms) for every connection. A URL's own
# ?connect_timeout= or ?options= wins.
DATABASES["default"]["OPTIONS"].setdefault("connect_timeout", env_int("GW_DB_CONNECT_TIMEOUT", 3))
DATABASES["default"]["OPTIONS"].setdefault(
    "options", f"-c statement_timeout={env_int('GW_DB_STATEMENT_TIMEOUT_MS', 30_000)}")
# Hot-path ORM reads (llm_platform.db.orm: a key not cached, a route-table refresh) give up after
# this many seconds with a 503, whatever PostgreSQL does (a hung server answers no query at all).
DATABASE_CALL_TIMEOUT = env_float("GW_DB_CALL_TIMEOUT", 3.0)
# While PostgreSQL is away, keys and routes this process already knows keep serving past their
# freshness for at most this long (seconds); after that, calls that need them get 503.
DATABASE_STALE_SECONDS = env_float("GW_DB_STALE_SECONDS", 900.0)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [REDIS_URL], "prefix": "gw:chan:"},
    }
}

CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "gw:cache",
    }
}

# django-ratelimit (the admin login's per-IP limit, tenants/admin_login.py). Counters live in the
# shared Redis cache above, so every process counts the same attempts.
RATELIMIT_USE_CACHE = "default"
# Where the client's address comes from. REMOTE_ADDR is right for direct connections: the ASGI
# server sets it from the socket's peer. Behind a reverse proxy or load balancer REMOTE_ADDR is
# the proxy (all clients would share one counter), so operators set GW_RATELIMIT_IP_META_KEY to
# the forwarded header the proxy writes, as a META key, e.g. HTTP_X_REAL_IP. It must hold one
# address that the proxy overwrites (not X-Forwarded-For: a list that clients can prepend to).
RATELIMIT_IP_META_KEY = env_str("GW_RATELIMIT_IP_META_KEY", "REMOTE_ADDR")
# POSTs to /admin/login/ allowed per client address: N/s|m|h|d, optionally N/15m.
RATELIMIT_ADMIN_LOGIN_RATE = env_str("GW_ADMIN_LOGIN_RATE", "5/m")
# Redis down: refuse admin logins (503) rather than allow unlimited password guesses.
RATELIMIT_FAIL_OPEN = False

CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", REDIS_URL)
CELERY_RESULT_BACKEND = env_str("CELERY_RESULT_BACKEND", REDIS_URL)
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / ".data" / "static"

REST_FRAMEWORK = {
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "EXCEPTION_HANDLER": "gateway.api.errors.drf_exception_handler",
    "UNAUTHENTICATED_USER": None,
}

SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
SESSION_COOKIE_HTTPONLY = True

# Production behind TLS (README "In production"): GW_TLS=1 says clients reach the platform over
# HTTPS, TLS ending at the load balancer, which sets X-Forwarded-Proto. It turns on HSTS, the
# redirect to HTTPS and secure cookies; each has its own variable to override it.
TLS = env_bool("GW_TLS", False)
SECURE_SSL_REDIRECT = env_bool("GW_SSL_REDIRECT", TLS)
# Load balancers probe over plain HTTP: the probes are never redirected. Nor is the API: its
# hot paths are not Django's (never redirected), and a redirected POST would lose its body.
SECURE_REDIRECT_EXEMPT = [r"^health$", r"^ready$", r"^v1(/|$)"]
SECURE_HSTS_SECONDS = env_int("GW_HSTS_SECONDS", 31_536_000 if TLS else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("GW_HSTS_INCLUDE_SUBDOMAINS", TLS)
SECURE_HSTS_PRELOAD = env_bool("GW_HSTS_PRELOAD", TLS)
SESSION_COOKIE_SECURE = env_bool("GW_SECURE_COOKIES", TLS)
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
# Trust the proxy's X-Forwarded-Proto only when one sets it (it must overwrite a client's own).
if env_bool("GW_TRUST_X_FORWARDED_PROTO", TLS):
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

# --- the gateway's own knobs -------------------------------------------------------------
GATEWAY = {
    # How long a process trusts its in-memory copy of a key, tier or route table (seconds).
    # A revoke or a limit change reaches every process within this time.
    "LOCAL_CACHE_SECONDS": env_float("GW_LOCAL_CACHE_SECONDS", 3.0),
    # How long the shared Redis copy of a key's principal lives (invalidated on every change).
    "REDIS_CACHE_SECONDS": env_int("GW_REDIS_CACHE_SECONDS", 300),
    "MAX_BODY_BYTES": env_int("GW_MAX_BODY_BYTES", 4 * 1024 * 1024),
    "MAX_MESSAGES": env_int("GW_MAX_MESSAGES", 2048),
    "MAX_CONTENT_CHARS": env_int("GW_MAX_CONTENT_CHARS", 1_000_000),
    "MAX_TOOLS": env_int("GW_MAX_TOOLS", 128),
    # Upstream timeouts (seconds); routes may override later.
    "UPSTREAM_CONNECT_TIMEOUT": env_float("GW_UPSTREAM_CONNECT_TIMEOUT", 10.0),
    "UPSTREAM_TIMEOUT": env_float("GW_UPSTREAM_TIMEOUT", 600.0),
    # The built-in `local` model's pace, in tokens per second (0 = as fast as possible).
    "LOCAL_TOKENS_PER_SECOND": env_float("GW_LOCAL_TOKENS_PER_SECOND", 40.0),
    # Usage rows are buffered in this Redis stream and written to PostgreSQL in batches.
    "USAGE_STREAM": env_str("GW_USAGE_STREAM", "gw:usage"),
    # After a batch smaller than a full one, the writer waits this long before reading again, so
    # that its next batch (one transaction, one acknowledgement) carries the rows of that time
    # rather than one or two: far less CPU per row under load, rows in PostgreSQL that much later.
    "USAGE_WRITER_LINGER_MS": env_float("GW_USAGE_WRITER_LINGER_MS", 50.0),
    # Rows that cannot reach Redis wait here on local disk until it answers (a volume in containers).
    "USAGE_SPOOL_DIR": env_str("GW_USAGE_SPOOL_DIR", str(BASE_DIR / ".data" / "usage-spool")),
    "ALERT_STREAM": env_str("GW_ALERT_STREAM", "gw:alerts"),
    "BREAKER_STREAM": env_str("GW_BREAKER_STREAM", "gw:breaker-events"),
    # Streamed events are kept this long for resume (GET /v1/streams/{id} with Last-Event-ID).
    "STREAM_TTL_SECONDS": env_int("GW_STREAM_TTL_SECONDS", 600),
    # After SIGTERM, calls still running this long are ended by the platform (a retryable error
    # event, a row that says so) before the server's own graceful timeout would cut them.
    "SHUTDOWN_GRACE_SECONDS": env_float("GW_SHUTDOWN_GRACE_SECONDS", 8.0),
    # An admitted call not renewed by its process for this long counts as lost with it, and is
    # billed from the call journal (gateway/chat/journal.py).
    "JOURNAL_TTL_SECONDS": env_float("GW_JOURNAL_TTL_SECONDS", 60.0),
    # Calls admitted within this many ms go to the journal together; one that ends sooner never does.
    "JOURNAL_DELAY_MS": env_float("GW_JOURNAL_DELAY_MS", 5.0),
    # How long stored Responses API responses (`previous_response_id`, retrieve) are kept.
    "RESPONSES_TTL_DAYS": env_int("GW_RESPONSES_TTL_DAYS", 30),
    "STREAM_RESUME_ENABLED": env_bool("GW_STREAM_RESUME_ENABLED", True),
    # How long a completed request's response is kept for replay under its Idempotency-Key.
    "IDEMPOTENCY_TTL_SECONDS": env_int("GW_IDEMPOTENCY_TTL_SECONDS", 86400),
    # Retries, circuit breakers and fallback across lanes. Off only for benchmarks.
    "RESILIENCE_ENABLED": env_bool("GW_RESILIENCE_ENABLED", True),
    # Limits (requests/min, tokens/min, concurrency, budgets). Off only for benchmarks.
    "LIMITS_ENABLED": env_bool("GW_LIMITS_ENABLED", True),
    # A concurrency slot expires this long after its last heartbeat (a killed worker's slot).
    "SLOT_TTL_SECONDS": env_float("GW_SLOT_TTL_SECONDS", 60.0),
    # Far from every limit, an admission also takes a lease of up to this many more requests like
    # it, which the process then admits without a round trip (0: every request goes to Redis).
    "LEASE_UNITS": env_int("GW_LIMITS_LEASE_UNITS", 128),
    # A lease admits for at most this long (and is given back after a tenth of it idle).
    "LEASE_SECONDS": env_float("GW_LIMITS_LEASE_SECONDS", 1.0),
    # The hot path's Redis client: llm_platform/resp.py (`resp`) or redis-py's asyncio client
    # behind the same interface (`redis-py`); see README, "Limits".
    "REDIS_CLIENT": env_str("GW_REDIS_CLIENT", "resp"),
    # A version of a Redis function library (one per deploy) that no process has used for this
    # long is deleted (each process says which it uses once a minute).
    "FUNCTION_IDLE_SECONDS": env_float("GW_FUNCTION_IDLE_SECONDS", 3600.0),
    # Settlement and usage rows leave for Redis with the next request's admission, or after at
    # most this many milliseconds: one write and one Redis wake-up instead of two under load.
    "REDIS_DEFER_MS": env_float("GW_REDIS_DEFER_MS", 2.0),
    # Completion tokens reserved at admission when a request sets no max_tokens.
    "DEFAULT_RESERVE_TOKENS": env_int("GW_DEFAULT_RESERVE_TOKENS", 1024),
    # Failed authentications per client address before further failures get 429.
    "BAD_KEY_RATE": env_str("GW_BAD_KEY_RATE", "20/m"),
    # Operator token for /status (besides a logged-in staff session).
    "STATUS_TOKEN": env_str("GW_STATUS_TOKEN"),
}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "llm_platform.logs.JsonFormatter"}},
    # No upstream credential in any line, whatever a provider echoed (gateway/providers/credentials.py).
    "filters": {"credentials": {"()": "gateway.providers.credentials.RedactCredentials"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "json", "filters": ["credentials"]}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {
        "django.request": {"level": "ERROR"},
        "httpx": {"level": "WARNING"},
        "httpx2": {"level": "WARNING"},
        # uvicorn logs an exception that escapes the application with its own handler: filtered here.
        "uvicorn.error": {"filters": ["credentials"]},
    },
}
