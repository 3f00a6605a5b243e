"""Shared test helpers (servers, clusters, tiny models, the CLI runner). `tests/conftest.py` puts `tests/` on
`sys.path`, so every test module imports them as `from helpers.<module> import ...`; fixtures live in conftest.py."""
