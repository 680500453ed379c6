"""`restore_spend [SLUG ...]`: rebuild budget totals in Redis from PostgreSQL's usage rows."""

from django.core.management.base import BaseCommand, CommandError

from gateway.limits.spend_floor import restore_spend
from tenants.models import Tenant


class Command(BaseCommand):
    help = ("Raise the day and month spend that budgets are checked against (kept in Redis) to at least "
            "the usage recorded in PostgreSQL: run it after Redis lost its data. Safe to run any time.")

    def add_arguments(self, parser):
        parser.add_argument("slugs", nargs="*", help="tenants to restore (default: every tenant with a budget)")

    def handle(self, *args, **options):
        unknown = set(options["slugs"]) - set(Tenant.objects.filter(slug__in=options["slugs"]).values_list("slug", flat=True))
        if unknown:
            raise CommandError(f"No tenant {', '.join(sorted(unknown))}.")
        results = restore_spend(options["slugs"] or None)
        failed = [r for r in results if r.error]
        for r in results:
            if r.error:
                self.stderr.write(f"{r.tenant} ({r.scope}): NOT restored: {r.error}")
                continue
            day = "-" if r.day is None else f"${r.day:.6f}"
            month = "-" if r.month is None else f"${r.month:.6f}"
            self.stdout.write(f"{r.tenant} ({r.scope}): today {day}, this month {month}")
        self.stdout.write(f"{len(results) - len(failed)} budget scope(s) restored.")
        if failed:
            raise CommandError(f"{len(failed)} budget scope(s) could not be restored (listed above); the others were.")
