"""The audience-lists pipeline: inbox -> memberships -> plan -> send -> record.

Pure rules (membership, identity, planner) decide; apply, remote, send and recovery do the I/O
through `listsync.db` and the Iterable client.
"""
