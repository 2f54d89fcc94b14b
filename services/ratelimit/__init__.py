"""Rate limit service: token-aware limits per key, team, org, client IP and globally, in Redis."""
