"""`lorafleet api`: the OpenAI-compatible fine-tuning service on Ray Serve, and `lorafleet api keys create`.

The service's modules (FastAPI, Ray Serve) are imported inside the commands: they come with the `api` extra
(`pip install 'lorafleet[api]'`), and without it `lorafleet api` says so in one line (exit 2). Creating keys needs
only the database, so it works without the extra.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Optional

import click

from lorafleet.cli.errors import UsageError

# What the service imports beyond the base install (python-multipart parses uploads).
SERVICE_MODULES = ("fastapi", "uvicorn", "starlette", "python_multipart")

db_option = click.option("--db", default=None, metavar="URL",
                         help="The service's database, sqlite:///PATH (default: $LORAFLEET_HOME/api/lorafleet.db).")


def _missing_extra() -> Optional[str]:
    for name in SERVICE_MODULES:
        if importlib.util.find_spec(name) is None:
            return name
    return None


@click.group(invoke_without_command=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address the HTTP API listens on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="Its port.")
@click.option("--direct-ingress/--no-direct-ingress", default=True, show_default=True,
              help="With the embedded Ray: the Serve replica answers on --port itself, Serve's proxy on a free port "
                   "beside it; --no-direct-ingress: through the proxy on --port. On a cluster (--address), its "
                   "`ray start` environment decides (docs/api.md).")
@click.option("--address", default=None, metavar="ADDRESS",
              help="Ray cluster to run on (auto, HOST:PORT); default: an embedded local Ray instance.")
@db_option
@click.option("--models", default=None, type=click.Path(dir_okay=False, exists=True),
              help="models.yaml: the model names clients may send (default: the shipped demo base).")
@click.option("--storage", default=None, metavar="URI",
              help="Where uploaded files go: a folder, s3:// or gs:// (default: $LORAFLEET_HOME/api).")
@click.option("--max-upload-mb", default=512, show_default=True, type=click.IntRange(min=1),
              help="Largest file upload accepted (larger: HTTP 413).")
@click.pass_context
def api(ctx: click.Context, host: str, port: int, direct_ingress: bool, address: Optional[str], db: Optional[str],
        models: Optional[str], storage: Optional[str], max_upload_mb: int) -> None:
    """Serve the OpenAI-compatible fine-tuning jobs API on Ray Serve (blocks until Ctrl-C)."""
    if ctx.invoked_subcommand is not None:
        return
    missing = _missing_extra()
    if missing is not None:
        raise UsageError(f"lorafleet api needs the service's packages ({missing} is missing): "
                         "pip install 'lorafleet[api]'")
    from lorafleet.remote.client import auth_token

    # A token-auth cluster (the default of Ray 2.60's `ray start`) needs the driver told to send the token, and Ray
    # reads this when it is imported: before the service's modules import it.
    if auth_token() and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
    from lorafleet.service.db import DatabaseError
    from lorafleet.service.serve import ServiceError, run_service, service_config
    from lorafleet.spec import SpecError

    try:
        config = service_config(db=db, models=models, storage=storage, max_upload_bytes=max_upload_mb * 1024 * 1024)
    except (SpecError, DatabaseError) as exc:
        raise UsageError(*str(exc).splitlines()) from None
    click.echo(f"lorafleet: starting the API on http://{host}:{port}/v1 (Ray: {address or 'embedded'}, "
               f"db {config['db']})", err=True)

    def ready(url: str) -> None:
        click.echo(f"lorafleet: API ready at {url}", err=True)

    try:
        code = run_service(host=host, port=port, address=address, config=config, on_ready=ready,
                           direct_ingress=direct_ingress)
    except ServiceError as exc:
        raise UsageError(str(exc)) from None
    sys.exit(code)


@api.group()
def keys() -> None:
    """Manage API keys (each belongs to a tenant)."""


@keys.command("create")
@click.option("--tenant", required=True, help="The tenant the key belongs to (created if new).")
@click.option("--max-concurrent", default=None, type=click.IntRange(min=1),
              help="Jobs of the tenant that may run at once (default 1 for a new tenant).")
@click.option("--priority", default=None, type=int, help="The tenant's default job priority (higher runs first).")
@click.option("--admin", is_flag=True, help="An admin key: sees and manages every tenant's objects.")
@db_option
def create_key_command(tenant: str, max_concurrent: Optional[int], priority: Optional[int], admin: bool,
                       db: Optional[str]) -> None:
    """Create an API key; the key is the last line of stdout and is shown only once."""
    from lorafleet.service.auth import create_key
    from lorafleet.service.db import Database, DatabaseError

    try:
        database = Database(db)
        key = create_key(database, tenant, max_concurrent=max_concurrent, admin=admin, priority=priority)
    except (ValueError, DatabaseError) as exc:
        raise UsageError(str(exc)) from None
    click.echo(f"lorafleet: key for tenant {tenant}{' (admin)' if admin else ''} in {database.path}; "
               "it is shown only once", err=True)
    click.echo(key)


COMMANDS = (api,)
