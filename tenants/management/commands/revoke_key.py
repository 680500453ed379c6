from tenants.services import revoke_key

from ._base import OperatorCommand


class Command(OperatorCommand):
    help = "Revoke an API key by its visible prefix; takes effect within seconds everywhere."

    def add_arguments(self, parser):
        parser.add_argument("prefix")

    def handle(self, prefix, **options):
        key = revoke_key(prefix)
        self.stdout.write(f"revoked key {key.prefix}… of tenant {key.tenant.slug}")
