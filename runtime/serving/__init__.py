"""Serving a bundle over HTTP: an OpenAI-compatible API (FastAPI) over the scheduler, and
a Ray Serve application of replicas of it. Needs the `serve` extra (`ray` for Ray Serve).

    peft-export serve bundle/ --port 8000
"""
