"""The fault suite (issue 24): one part of a running mesh killed or hung under load, and what clients and the
ledger saw. ``make faults`` runs it in full and records the table; ``make test`` runs it shortened."""
