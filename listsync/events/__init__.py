"""The per-event actions pipeline (Iterable (Actions)): inbox -> route -> send -> record.

Pure modules (triggers, fields, mapping, actions) turn an event into Iterable request bodies;
route and delivery store and send them.
"""
