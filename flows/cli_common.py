"""What every ``creditflow`` command shares: the ``-w``/``--config``/``--set`` options and the error wrapper."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import typer

from creditflow.flows.render import console


def _use_workspace(value: Optional[str]) -> Optional[str]:
    """``-w`` callback: point this process at the workspace's servers (``creditflow up``) before Prefect or MLflow
    are imported, which read their settings once, at import."""
    from creditflow.flows.ops import use_servers

    with user_errors():  # e.g. -w names a file, not a folder
        use_servers(value)
    return value


ConfigOpt = typer.Option(None, "--config", "-c", help="Pipeline YAML (see configs/). Default: built-in demo settings.")
WorkspaceOpt = typer.Option(
    None,
    "--workspace",
    "-w",
    help="Workspace folder (default $CREDITFLOW_WORKSPACE or ./creditflow-workspace).",
    callback=_use_workspace,
)
SetOpt = typer.Option(
    None, "--set", help="Override a config key, e.g. --set curate.eval_fraction=0.2 (value parsed as YAML)."
)
# What a user can get wrong (a config, an input file, a missing artifact): one line, no traceback.
USER_ERRORS = (ValueError, RuntimeError, OSError, KeyError)  # CatalogError and ArtifactError are RuntimeErrors


DEBUG = {"on": False}  # set by the app callback from --debug


@contextmanager
def user_errors() -> Iterator[None]:
    """A user error (bad config, bad input, missing artifact) as one line; the traceback only with --debug."""
    try:
        yield
    except USER_ERRORS as exc:
        if DEBUG["on"]:
            raise
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)  # paths stay whole
        console.print("(creditflow --debug ... shows the traceback)", style="dim")
        raise typer.Exit(code=2) from None


def config_dict(config: Optional[Path], overrides: Optional[list[str]]) -> dict[str, Any]:
    from creditflow.flows.config import load_config, parse_overrides

    return load_config(config, parse_overrides(overrides or [])).model_dump(mode="json")
