"""The control plane: keys and roles (``keys.py``), orgs, teams, limits, budgets, prices and the audit log
(``plane.py``), the model registry with versioned prices (``registry.py``, ``pricing.py``), A/B
experiments (``experiments.py``, ``experiment_stats.py``), first-start bootstrap (``bootstrap.py``) and the
AdminService RPCs (``admin_servicer.py``, ``dead_letter_rpc.py``). It never reaches into the pipeline.
"""
