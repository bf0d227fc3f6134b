"""Receive -> inbox: Segment-format events in, validated events stored before the 200.

Pure: `extract` (parse bodies, validate events, audience deltas), `scrub` (secrets out of what is
kept), `webhook` (what Segment's webhooks sign). I/O: `receiver` (Segment's HTTP API and the
webhook route), `files` (NDJSON streams and the drop folder), `sql_source` (reverse ETL),
`sources` (the polled sources as jobs), all ending in `accept` (validate and append to the inbox).
"""
