"""ledger_svc: the system of record for points (members, accounts, journal, holds, lots, outbox)."""
