"""OpenAI-compatible HTTP edge: ``/v1/chat/completions`` and ``/v1/models`` translated to RouterService."""
