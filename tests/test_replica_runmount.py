"""Not tests: a mount with a replication target, for tests/test_replica_e2e.py to run as a
subprocess (until fusefs/cli.py wires in fusefs.replica.cli).

    python tests/test_replica_runmount.py BACKING MOUNTPOINT --target H:P --key-file F
        [--replicate async|sync] [--replica-log-dir D] [--data MODE] [--source NAME]

Prints "ready" on stdout once mounted; serves until unmounted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from fusefs.mirror import MirrorFS
    from fusefs.options import parse_options
    from fusefs.replica.cli import add_mount_arguments, close_sink, make_sink
    from fusefs.session.session import run_session

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    parser = argparse.ArgumentParser()
    parser.add_argument("backing")
    parser.add_argument("mountpoint")
    parser.add_argument("--data", default="auto")
    add_mount_arguments(parser)
    args = parser.parse_args()
    sink = make_sink(args, args.backing)
    ops = MirrorFS(args.backing, changes=sink)

    def ready() -> None:
        print("ready", flush=True)

    try:
        run_session(ops, args.mountpoint, parse_options([f"data={args.data}"]), ready)
    finally:
        close_sink(sink, args.mountpoint)
