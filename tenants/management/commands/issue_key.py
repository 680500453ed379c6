from tenants.services import issue_key

from ._base import OperatorCommand


class Command(OperatorCommand):
    help = "Issue an API key for a tenant; the secret is printed once and never stored."

    def add_arguments(self, parser):
        parser.add_argument("slug")
        parser.add_argument("--name", default="")
        parser.add_argument("--expires-in", type=int, default=None, metavar="DAYS")
        parser.add_argument("--quiet", action="store_true", help="print only the secret")

    def handle(self, slug, name, expires_in, quiet, **options):
        key, secret = issue_key(slug, name=name, expires_in_days=expires_in)
        if quiet:
            self.stdout.write(secret)
            return
        expiry = key.expires_at.isoformat() if key.expires_at else "never"
        self.stdout.write(f"issued key {key.prefix}… for tenant {slug} (expires: {expiry})")
        self.stdout.write("secret (shown once, store it now):")
        self.stdout.write(secret)
