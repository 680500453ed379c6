"""Load model routes from a YAML/JSON file: an idempotent upsert; a bad file changes nothing."""

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from gateway.models import Lane, ModelRoute
from gateway.routes_file import RoutesFileError, parse_routes


class Command(BaseCommand):
    help = "Upsert model routes and their lanes from a YAML or JSON file."

    def add_arguments(self, parser):
        parser.add_argument("file")
        parser.add_argument("--prune", action="store_true", help="disable routes not in the file")

    def handle(self, file, prune, **options):
        path = Path(file)
        if not path.is_file():
            raise CommandError(f"{file}: no such file")
        try:
            routes = parse_routes(path.read_text())
        except RoutesFileError as exc:
            raise CommandError(f"{file}: {exc}; nothing was changed") from None
        with transaction.atomic():
            for data in routes:
                route, created = ModelRoute.objects.update_or_create(
                    model=data.model, defaults={"description": data.description, "is_enabled": True}
                )
                route.lanes.all().delete()
                Lane.objects.bulk_create([
                    Lane(route=route, position=i, provider=lane.provider,
                         upstream_model=lane.upstream_model, base_url=lane.base_url,
                         api_key_env=lane.api_key_env, context_window=lane.context_window,
                         price_input=lane.price_input, price_output=lane.price_output,
                         price_cached_input=lane.price_cached_input, options=lane.options)
                    for i, lane in enumerate(data.lanes)
                ])
                route.save()  # bumps updated_at and signals processes to refresh
            disabled = 0
            if prune:
                disabled = ModelRoute.objects.exclude(model__in=[r.model for r in routes]).update(is_enabled=False)
        self.stdout.write(f"loaded {len(routes)} route(s) from {file}" + (f", disabled {disabled}" if prune else ""))
