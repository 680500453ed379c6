"""`set_limits SLUG [--key PREFIX] [--rpm N] ...`: change a tenant's or one key's limits."""

from __future__ import annotations

from decimal import Decimal

from django.core.management.base import CommandParser

from tenants.models import ApiKey
from tenants.services import LIMIT_FLAGS, effective_limits, set_limits

from ._base import OperatorCommand

_HELP = {  # flag: (metavar, help)
    "rpm": ("N", "requests per minute"),
    "rph": ("N", "requests per hour"),
    "tpm": ("N", "tokens per minute"),
    "concurrency": ("N", "requests in flight at once"),
    "max-tokens": ("N", "largest max_tokens a request may ask for"),
    "daily-budget": ("USD", "USD per day"),
    "monthly-budget": ("USD", "USD per month"),
    "models": ("A,B", 'model names the key or tenant may use; "" for every model'),
}


def _show(value: object) -> str:
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "all models"
    if value is None:
        return "unlimited"
    return f"{value.normalize():f}" if isinstance(value, Decimal) else str(value)


class Command(OperatorCommand):
    help = (
        "Change limits: without --key the tenant's own tier (a shared tier is first cloned into "
        "<slug>-custom, so other tenants keep theirs); with --key one key's overrides. "
        "'none' clears a limit (unlimited on a tier, the tier's value on a key)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("slug")
        parser.add_argument("--key", default=None, metavar="PREFIX", help="a key of this tenant")
        for flag, field in LIMIT_FLAGS.items():
            # Values stay text: the service parses them, so a bad one is a message, exit 1.
            metavar, text = _HELP[flag]
            parser.add_argument(
                f"--{flag}", dest=field, default=None, metavar=f"{metavar}|none", help=text
            )

    def handle(self, slug: str, key: str | None, **options: object) -> None:
        changes = {field: options[field] for field in LIMIT_FLAGS.values() if options[field] is not None}
        target = set_limits(slug, key_prefix=key, **changes)
        if isinstance(target, ApiKey):
            self.stdout.write(f"limits of key {target.prefix}… of tenant {slug}:")
        else:
            self.stdout.write(f"limits of tenant {slug} (its own tier {target.name}):")
        for field, value, source in effective_limits(target):
            self.stdout.write(f"{field}: {_show(value)} ({source})")
