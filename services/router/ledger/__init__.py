"""The usage ledger: what each served request cost (``events.py``), recorded on a Redis stream or a local
spool (``spool.py``), written to PostgreSQL exactly once (``writer.py``), with entries it cannot store kept
as dead letters (``dead_letters.py``) and reported on the health service (``health.py``). It knows neither
the pipeline nor the control plane.
"""
