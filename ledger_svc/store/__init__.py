"""Ledger storage backends behind one protocol (store/base.py)."""
