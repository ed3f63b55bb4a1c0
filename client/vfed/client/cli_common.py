"""What every `vfed` command shares: one-line errors with exit code 1, a client built from `vfed login`."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import sys
from collections.abc import Callable, Coroutine, Sequence
from functools import wraps
from typing import Any, TypeVar

import aiohttp
import click
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from vfed.client import credentials
from vfed.client.client import AsyncClient
from vfed.client.errors import ClientError
from vfed.common import tls
from vfed.common.crypto import CryptoError
from vfed.common.payload import AlgorithmError
from vfed.common.tls import CaFileError
from vfed.common.trust import TrustError

F = TypeVar("F", bound=Callable[..., Any])

FORMAT = click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="table: aligned columns for people; json: one JSON document for scripts",
)
"""`--format table|json`, on every listing command."""


def fail(message: str, code: int = 1) -> None:
    """One line on stderr, then exit `code` (1: a failure; 2: input the command cannot use)."""
    click.echo(f"vfed: error: {message}", err=True)
    sys.exit(code)


def handled(fn: F) -> F:
    """Turns every expected failure into one line on stderr and exit code 1."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise  # usage errors: click prints them and exits 2
        except ClientError as exc:
            fail(str(exc))
        except CaFileError as exc:
            fail(str(exc))
        except aiohttp.ClientSSLError as exc:  # certificate or handshake: say what to fix
            fail(tls.explain(exc, _ca_file()) or str(exc))
        except TrustError as exc:
            fail(exc.message)
        except (CryptoError, AlgorithmError, OSError) as exc:
            fail(str(exc).splitlines()[0])
        except ValidationError as exc:
            fail(f"invalid input: {exc.errors()[0]['msg']}")
        except Exception as exc:  # aiohttp connection errors and the like: still one clear line
            fail(f"{exc.__class__.__name__}: {exc}")
        return None

    return wrapper  # type: ignore[return-value]


def _ca_file() -> str | None:
    """The CA file a failed command used: VFED_CA_FILE, else the one `vfed login` saved."""
    return os.environ.get("VFED_CA_FILE") or credentials.load().get("ca_file")


def make_client() -> AsyncClient:
    saved = credentials.load()
    client = AsyncClient(
        saved.get("url"),
        key_file=saved.get("key_file"),
        token=saved.get("access_token"),
        ca_file=saved.get("ca_file"),
    )
    client.api.refresh_token = saved.get("refresh_token")
    if saved.get("user_id") is not None and saved.get("organization_id") is not None:
        client.user_id, client.organization_id = int(saved["user_id"]), int(saved["organization_id"])
    return client


def run(make: Callable[[AsyncClient], Coroutine[Any, Any, Any]]) -> Any:
    """Run one client call; keep a refreshed token for the next command."""

    async def go() -> Any:
        async with make_client() as client:
            result = await make(client)
            saved = credentials.load()
            if saved and client.api.token and client.api.token != saved.get("access_token"):
                saved.update(access_token=client.api.token, refresh_token=client.api.refresh_token)
                credentials.save(saved)
            return result

    return asyncio.run(go())


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Aligned columns (a rich table without borders): never wrapped when piped, bold headers only on a
    terminal and never under NO_COLOR."""
    tty = sys.stdout.isatty()
    plain = not tty or bool(os.environ.get("NO_COLOR"))
    buf = io.StringIO()
    console = Console(
        file=buf,
        force_terminal=not plain,
        no_color=plain,
        width=shutil.get_terminal_size().columns if tty else 100_000,
        highlight=False,
    )
    table = Table(box=None, pad_edge=False, header_style="" if plain else "bold", show_edge=False)
    for header in headers:
        table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(*(Text("-" if cell is None or cell == "" else str(cell)) for cell in row))
    console.print(table)
    for line in buf.getvalue().splitlines():
        click.echo(line.rstrip())
