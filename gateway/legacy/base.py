"""The one interface every legacy adapter implements.

`parse` never raises for bad data: a record it cannot read comes out as `Quarantined` lines
with their line numbers and the reason, and parsing goes on, so one bad row never costs the
rest of a file.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from gateway.legacy.records import Parsed

# What Windows tools put before the UTF-8 text they save (Notepad, Excel's "CSV UTF-8"): not
# part of the first record, whatever the format.
UTF8_BOM = b"\xef\xbb\xbf"


class Adapter(Protocol):
    @property
    def name(self) -> str:
        """Short name used by the CLI (`--adapter`) and in quarantine entries."""
        ...

    @property
    def default_channel(self) -> str:
        """Channel for records whose source does not say one; part of the receipt's natural key."""
        ...

    def parse(self, source: str, data: bytes) -> Iterator[Parsed]:
        """Records in source order; `source` names the file or delivery for quarantine entries."""
        ...
