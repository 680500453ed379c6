"""The Django project package (named llm_platform: a top-level `platform` shadows the stdlib)."""

from .celery import app as celery_app

__all__ = ["celery_app"]
