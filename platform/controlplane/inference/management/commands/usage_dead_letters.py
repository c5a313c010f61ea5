"""`atelier manage usage_dead_letters`: list, replay or discard parked usage reports.

The usage-stream consumer parks the entries it refuses in `USAGE_DEAD_STREAM`
(the original fields plus `reason`, `error` and the original `entry_id`). Once the
cause is fixed (the consumer's checks, the database, or the report itself, re-added
by hand), `--replay` puts each chosen entry's `report` back on the usage stream and
removes it from the dead letters, in one MULTI: the consumer stores it as any other
report, once (its request id decides), or parks it again if it is still refused.
"""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError

from controlplane.core.redis_clients import sync_client
from controlplane.inference.usage_stream import USAGE_DEAD_STREAM
from jobcontracts.inference import USAGE_STREAM


class Command(BaseCommand):
    help = (
        "List the usage reports parked in the dead-letter stream (oldest first), or with "
        "--replay / --discard put the chosen ones back on the usage stream / drop them."
    )

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("ids", nargs="*", help="Dead-letter entry ids (default: all listed).")
        parser.add_argument("--reason", help="Only entries parked for this reason.")
        parser.add_argument("--count", type=int, default=1000, help="At most this many [1000].")
        action = parser.add_mutually_exclusive_group()
        action.add_argument("--replay", action="store_true", help="Re-add them to the stream.")
        action.add_argument("--discard", action="store_true", help="Delete them for good.")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["discard"] and not (options["ids"] or options["reason"]):
            raise CommandError("--discard needs the ids to drop, or a --reason")
        client: Any = sync_client()
        if options["ids"]:
            letters = []
            for entry_id in options["ids"]:
                found = client.xrange(USAGE_DEAD_STREAM, entry_id, entry_id)
                if not found:
                    raise CommandError(f"no dead letter {entry_id} in {USAGE_DEAD_STREAM}")
                letters += found
        else:
            letters = client.xrange(USAGE_DEAD_STREAM, count=options["count"])
        if options["reason"]:
            letters = [
                (i, f) for i, f in letters if f.get(b"reason", b"").decode() == options["reason"]
            ]
        done = 0
        for raw_id, fields in letters:
            entry_id = raw_id.decode()
            text = {k.decode(): v.decode(errors="replace") for k, v in fields.items()}
            if options["discard"]:
                client.xdel(USAGE_DEAD_STREAM, raw_id)
            elif options["replay"]:
                if b"report" not in fields:
                    self.stderr.write(f"{entry_id}: no `report` field to replay; left in place")
                    continue
                pipe = client.pipeline(transaction=True)
                pipe.xadd(USAGE_STREAM, {"report": fields[b"report"]})
                pipe.xdel(USAGE_DEAD_STREAM, raw_id)
                pipe.execute()
            else:
                self.stdout.write(
                    f"{entry_id}  {text.get('reason', '?')}  (was {text.get('entry_id', '?')})\n"
                    f"    error:  {text.get('error', '')}\n"
                    f"    report: {text.get('report', '<none>')}"
                )
            done += 1
        verb = "replayed" if options["replay"] else "discarded" if options["discard"] else "listed"
        self.stdout.write(f"{done} dead letter(s) {verb} ({USAGE_DEAD_STREAM})")
