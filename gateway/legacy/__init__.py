"""Legacy adapters: CSV drops, mainframe fixed-width exports and vendor webhooks, turned into
the same RecordPurchase/RecordReturn commands every other channel sends (docs/legacy.md)."""

from gateway.legacy.importer import ADAPTERS, ImportInterrupted, ImportReport, import_file, import_records

__all__ = ["ADAPTERS", "ImportInterrupted", "ImportReport", "import_file", "import_records"]
