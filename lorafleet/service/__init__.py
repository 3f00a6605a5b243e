"""The fine-tuning service: an OpenAI-compatible jobs API with tenants and a persistent queue, on Ray Serve.

`db` (SQLite state and its migrations), `auth` (API keys), `files` (uploaded files in run storage, chat JSONL
checks), `catalog` (`models.yaml`: the names clients send as `model`), `jobs` (a request → a validated job spec, and
the OpenAI object shapes), `scheduler` (the queue: validation, admission, polling Ray jobs, reconciliation), `app`
(the FastAPI routes), `serve` (the Ray Serve deployment and `lorafleet api`'s start-up).
"""
