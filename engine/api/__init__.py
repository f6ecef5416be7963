"""HTTP API for app backends, shop terminals, gateways and staff.

`engine.api:app` is the app for `uvicorn engine.api:app`, serving the data
directory in $GENKI_HOME (default ./genki-data); it is built on first access
so that importing this package (the `genki` CLI does) stays cheap.
`engine.api.app.create_app(data_dir)` builds one for any directory.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from engine.api.app import create_app
    from engine.config import default_data_dir

    instance = create_app(default_data_dir())
    # Importing the submodule engine.api.app bound the name to it; the app wins.
    globals()["app"] = instance
    return instance
