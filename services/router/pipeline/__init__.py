"""The request path, as stages in the order a request meets them (read the modules in this order):

1. ``authenticate.py`` - bearer key -> KeyRecord (the servicer calls it, then decodes the command)
2. ``route.py``        - the chain of models: requested / auto (``complexity.py``) / experiment, fallbacks
3. ``retrieve.py``     - the tenant's documents as context (only when asked)
4. ``lookup.py``       - the cache; a hit is served here and its saving priced
5. ``admit.py``        - degradation level, priority shedding, the reservation: where the budget is checked
6. ``generate.py``     - the first healthy replica of the chain, with retries (``failover.py``) and hedging
                          (``hedging.py``)
7. ``account.py``      - the price of the answer, then commit, cache store and ledger, exactly once

``gateway.py`` runs them; ``request.py`` is the state they share; ``ports.py`` what they ask of other
services. ``degradation.py``, ``shedding.py``, ``local_limits.py`` (the
limiter used while the ratelimit service is unreachable) and ``local_charges.py`` (what it admitted, charged to
the service when it answers again) serve admission. No module here imports gRPC.
"""
