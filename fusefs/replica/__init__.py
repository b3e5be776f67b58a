"""Live replication of a mirror to a replica directory on another host (issue #5).

- :mod:`~fusefs.replica.wire`: the sans-IO wire codec (docs/protocol.md)
- :mod:`~fusefs.replica.target`: the abstract replication target
- :mod:`~fusefs.replica.apply`: applying changes to a replica directory safely
- :mod:`~fusefs.replica.server`: ``fusefs serve``
- :mod:`~fusefs.replica.log`: the durable, ordered log of changes not yet acknowledged
- :mod:`~fusefs.replica.client`: :class:`ReplicationSink`, the mirror's change sink
- :mod:`~fusefs.replica.cli`: subcommands and mount arguments for fusefs/cli.py
"""
