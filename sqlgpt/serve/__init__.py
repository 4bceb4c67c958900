"""sqlgpt serve: OpenAI's HTTP dialect over loaded models, with continuous
batching (scheduler.py), the protocol's checks and objects (protocol.py),
the routes (app.py), counters (metrics.py) and a chat page (page.html)."""
