"""Run the usage writer: drains the Redis usage stream into PostgreSQL until stopped."""

import signal
import time

from django.core.management.base import BaseCommand
from django.db import close_old_connections


class Command(BaseCommand):
    help = "Write buffered usage rows to PostgreSQL (batched, at least once, deduplicated)."

    def add_arguments(self, parser):
        parser.add_argument("--consumer", default=None, help="consumer name (stable across restarts)")
        parser.add_argument("--once", action="store_true", help="drain what is there, then exit")

    def handle(self, consumer, once, **options):
        from billing.writer import default_consumer, drain_all, drain_once

        consumer = consumer or default_consumer()
        if once:
            self.stdout.write(f"wrote {drain_all(consumer)} usage row(s)")
            return
        stopping = False

        def stop(*_):
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        self.stdout.write(f"usage writer {consumer} running")
        while not stopping:
            try:
                drain_once(consumer, block_ms=500)
            except Exception:  # PostgreSQL or Redis away: entries stay pending; retry soon
                self.stderr.write("usage writer: batch failed, retrying in 1 s")
                close_old_connections()
                time.sleep(1)
