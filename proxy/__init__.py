"""turnout: switch HTTP traffic between immutable versions of a service."""

import importlib.util

__version__ = "0.1.0"


def data_plane_build() -> str:
    """"compiled (mypyc)" when the per-request modules are C extensions (see setup.py), else "pure Python".

    Read from where the module would load from, without importing it: `turnout --version` stays fast.
    """
    spec = importlib.util.find_spec("proxy.dataplane.downstream")
    origin = spec.origin if spec is not None else None
    return "compiled (mypyc)" if origin is not None and origin.endswith((".so", ".pyd")) else "pure Python"
