"""The one settings module. Everything that differs between machines comes from the environment."""

from __future__ import annotations

import os
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from sagas.durations import parse_duration

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("SAGAS_VAR_DIR", BASE_DIR / "var"))


def env_bool(name: str, default: bool = False) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in {"1", "true", "yes", "on"}:
        return True
    if raw.lower() in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (1/0, true/false), got {raw!r}")


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name) or str(default)
    try:
        return int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a whole number, got {raw!r}") from None


def env_seconds(name: str, default: str) -> int:
    raw = os.environ.get(name) or default
    try:
        return int(parse_duration(raw).total_seconds())
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name}: {exc}") from None


DEBUG = env_bool("DJANGO_DEBUG", False)

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("DJANGO_SECRET_KEY is required when DJANGO_DEBUG is off")
    SECRET_KEY = "insecure-development-key-set-DJANGO_SECRET_KEY-in-production"  # noqa: S105

ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["127.0.0.1", "localhost"] if DEBUG else [])
if not DEBUG and not ALLOWED_HOSTS:
    raise ImproperlyConfigured("DJANGO_ALLOWED_HOSTS is required when DJANGO_DEBUG is off")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_htmx",
    "csp",
    "django_rq",
    "sagas",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "csp.middleware.CSPMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "sagas.api_errors.DebugJsonErrorsMiddleware",
]

ROOT_URLCONF = "opsconsole.urls"
WSGI_APPLICATION = "opsconsole.wsgi.application"
ASGI_APPLICATION = "opsconsole.asgi.application"

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

DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL") or f"sqlite:///{VAR_DIR / 'opsconsole.sqlite3'}",
        conn_max_age=env_int("DATABASE_CONN_MAX_AGE", 60),
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Web server, worker and demo share one file: WAL lets readers work beside the writer,
    # IMMEDIATE transactions queue writers up front instead of failing on lock upgrade.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
    DATABASES["default"]["CONN_MAX_AGE"] = 0

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"

# --- Redis / RQ -----------------------------------------------------------------------
REDIS_URL = os.environ.get("REDIS_URL", "")
if not REDIS_URL:
    if not DEBUG:
        raise ImproperlyConfigured("REDIS_URL is required when DJANGO_DEBUG is off")
    REDIS_URL = "redis://127.0.0.1:6379/0"
RQ_QUEUES = {
    "default": {
        "URL": REDIS_URL,
        "DEFAULT_TIMEOUT": 3600,
    },
}

# --- Sagas ----------------------------------------------------------------------------
SAGA_MODULES = env_list(
    "SAGA_MODULES",
    ["sagas.examples.create_zip", "sagas.examples.chaos", "sagas.examples.flight_search"],
)
SAGAS_S3_BUCKET = os.environ.get("SAGAS_S3_BUCKET", "opsconsole-sagas")
AWS_ENDPOINT_URL = os.environ.get("AWS_ENDPOINT_URL", "")
SAGAS_REAPER_INTERVAL = env_seconds("SAGAS_REAPER_INTERVAL", "30s")
# How late a queued or scheduled job may be before the reaper enqueues it again.
SAGAS_REAPER_GRACE = env_seconds("SAGAS_REAPER_GRACE", "10s")
SAGAS_IDEMPOTENCY_TTL = env_seconds("SAGAS_IDEMPOTENCY_TTL", "24h")
# How long a running step may ignore a cancellation before RQ's stop-job kills it.
SAGAS_CANCEL_GRACE = env_seconds("SAGAS_CANCEL_GRACE", "10s")
# RQ job timeout for steps without their own timeout_s (the worker's parent kills past it).
SAGAS_JOB_TIMEOUT = env_seconds("SAGAS_JOB_TIMEOUT", "1h")
# How many times a job that finds its task locked is re-queued before the reaper takes over.
SAGAS_LOCK_REQUEUES = env_int("SAGAS_LOCK_REQUEUES", 5)
# How many times a worker without a step's code (an old worker in a rolling deploy) hands
# the job back for a worker that has it, with growing delays, before the task is parked.
SAGAS_CODE_REQUEUES = env_int("SAGAS_CODE_REQUEUES", 6)
# How long a finished step keeps trying to record its outcome while the database is
# unreachable (a restart, a managed failover), with backoff.
SAGAS_SETTLE_RETRY_FOR = env_seconds("SAGAS_SETTLE_RETRY_FOR", "2m")
# The one definition of a stuck task: active, nothing running or queued for it, and
# unchanged for longer than this.
SAGAS_STUCK_AFTER = env_seconds("SAGAS_STUCK_AFTER", "15m")
# Reconciliation (docs/reconciliation.md): how often the workers start a run, and where
# the "archive" orphan policy copies an object before deleting it.
SAGAS_RECONCILE_INTERVAL = env_seconds("SAGAS_RECONCILE_INTERVAL", "6h")
SAGAS_ARCHIVE_PREFIX = os.environ.get("SAGAS_ARCHIVE_PREFIX", "archive/")
# How many candidates one reaper job handles before it hands the rest of its pass on.
SAGAS_REAPER_BATCH = env_int("SAGAS_REAPER_BATCH", 500)
# Optional URL that receives a JSON POST when a task ends in compensation_failed.
SAGAS_COMPENSATION_FAILED_WEBHOOK = os.environ.get("SAGAS_COMPENSATION_FAILED_WEBHOOK", "")

RQ = {"WORKER_CLASS": "sagas.engine.worker.SagaWorker"}

# --- HTTP API -------------------------------------------------------------------------
# Largest request body the API reads (413 above it). Django's own limit on form data is
# the same, so no part of the site reads more into memory than the API would.
SAGAS_API_MAX_BODY_BYTES = env_int("SAGAS_API_MAX_BODY_BYTES", 256 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = SAGAS_API_MAX_BODY_BYTES
# JSON under /api/, Django's page elsewhere.
CSRF_FAILURE_VIEW = "sagas.api_errors.csrf_failure"
# django-rq's own admin pages empty queues and delete jobs with no audit entry and only a
# staff check: the console does not mount them.
RQ_SHOW_ADMIN_LINK = False

# --- Security: production-safe unless DJANGO_DEBUG is on ----------------------------
SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = True  # templates hand the token to htmx; no script reads the cookie
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
if not DEBUG:
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", True)
    SECURE_HSTS_SECONDS = env_int("DJANGO_HSTS_SECONDS", 31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = env_bool("DJANGO_HSTS_PRELOAD", False)
    if env_bool("DJANGO_TRUST_X_FORWARDED_PROTO", False):
        # Only behind a proxy that always sets this header itself: clients could forge it.
        SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS", [])

# A strict Content-Security-Policy (django-csp): the console serves htmx from its own
# static files and uses no inline script, inline style, eval or hx-on.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:"],
        "connect-src": ["'self'"],
        "font-src": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'none'"],
        "form-action": ["'self'"],
        "frame-ancestors": ["'none'"],
    }
}

ADMINS = [("Operators", addr) for addr in env_list("DJANGO_ADMINS", [])]
EMAIL_BACKEND = os.environ.get(
    "DJANGO_EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend"
)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {"()": "sagas.engine.logs.JsonFormatter"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": "plain"},
        "engine": {"class": "logging.StreamHandler", "formatter": "json"},
    },
    "root": {"handlers": ["console"], "level": os.environ.get("DJANGO_LOG_LEVEL", "INFO")},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
        # "Found credentials in environment variables" on every S3 client: noise.
        "botocore": {"level": "WARNING"},
        "sagas.engine": {"handlers": ["engine"], "level": "INFO", "propagate": False},
    },
}
