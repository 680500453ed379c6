"""Commands report operator mistakes as a message and exit status 1, never a traceback."""

from django.core.management.base import BaseCommand, CommandError

from tenants.services import TenantError


class OperatorCommand(BaseCommand):
    def execute(self, *args, **options):
        try:
            return super().execute(*args, **options)
        except TenantError as exc:
            raise CommandError(str(exc)) from None
