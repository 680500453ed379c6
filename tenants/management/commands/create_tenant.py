from tenants.services import create_tenant

from ._base import OperatorCommand


class Command(OperatorCommand):
    help = "Create a tenant (and its tier, with generous defaults, if the tier does not exist)."

    def add_arguments(self, parser):
        parser.add_argument("slug")
        parser.add_argument("--name", default=None)
        parser.add_argument("--tier", default="default")

    def handle(self, slug, name, tier, **options):
        tenant = create_tenant(slug, name=name, tier=tier)
        self.stdout.write(f"created tenant {tenant.slug} (tier {tenant.tier.name})")
