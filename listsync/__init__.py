"""listsync: keeps Iterable lists and profiles in step with CDP audiences and events."""

__version__ = "0.1.0"
