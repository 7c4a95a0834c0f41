"""The serverless gateway: OpenAI-compatible routing, scale from zero, load-aware balancing.

Data flow: Kubernetes watches (watchers.py) → routing table in memory (routes.py) → request path (server.py,
proxy.py), which never calls the API server except the single wake-up in activator.py. Activity Leases are written
by a background flusher (activity.py).
"""
