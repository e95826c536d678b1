"""The ways in: RunPod's queue handler and the HTTP API (OpenAI routes, WebSocket)."""
