"""Serving: an OpenAI-compatible HTTP server with continuous batching, and a chat page.

    lmforge serve MODEL [--host 127.0.0.1 --port 8000 --api-key KEY --max-batch 8]

``engine`` holds the continuous-batching decode loop (no web framework inside), ``api`` the FastAPI
routes and schemas, ``server`` the command (uvicorn), ``index.html`` the page at ``/``. FastAPI and
uvicorn are optional dependencies (``pip install "lmforge[serve]"``), imported only here.
"""
