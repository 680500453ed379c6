"""Run the usage writer: drains the Redis usage stream into PostgreSQL until stopped."""

import signal

from django.core.management.base import BaseCommand


class Command(BaseCommand):
    help = "Write buffered usage rows to PostgreSQL (batched, at least once, deduplicated)."

    def add_arguments(self, parser):
        parser.add_argument("--consumer", default=None, help="consumer name (stable across restarts)")
        parser.add_argument("--once", action="store_true", help="drain what is there, then exit")

    def handle(self, consumer, once, **options):
        from billing.writer import default_consumer, drain_all, run

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
        run(consumer, lambda: stopping, on_failure=lambda: self.stderr.write("usage writer: batch failed, retrying in 1 s"))
