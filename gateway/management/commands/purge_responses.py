"""`purge_responses`: delete stored Responses API responses past GW_RESPONSES_TTL_DAYS."""

from django.core.management.base import BaseCommand

from gateway.frontdoors.openai_responses import purge_expired


class Command(BaseCommand):
    help = ("Delete stored responses (/v1/responses) past their retention (GW_RESPONSES_TTL_DAYS); expired ones "
            "are already invisible to the API. Web processes also run this every hour.")

    def handle(self, *args, **options):
        self.stdout.write(f"{purge_expired()} expired stored response(s) deleted.")
