"""Response cache service: an exact tier in Redis (in-process LRU while Redis is down).

A semantic tier (embeddings, Qdrant, verifier) plugs in later as a second
:class:`services.cache.cache.CacheTier`.
"""
