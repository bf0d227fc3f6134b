"""Receive stage: Segment-format events in, validated events and audience deltas out.

`extract` is the pure core (parse, validate, extract, redact); the HTTP receiver and the pollers
around it do the I/O and hand what they read to the store.
"""
