"""Development and test tools, run from a checkout: never deployed, never imported by libs or services."""
