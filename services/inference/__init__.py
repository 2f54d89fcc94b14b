"""Inference service: runs generations on one engine (an HTTP LLM provider, later vLLM in-process).

Streams deltas then one result with usage; sheds load past its queue
(RESOURCE_EXHAUSTED + RetryInfo) and reports running/waiting for load-aware routing.
"""
