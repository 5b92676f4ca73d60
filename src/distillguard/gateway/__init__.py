"""The HTTP gateway: OpenAI-compatible API in front of the upstream, and the admin API."""
