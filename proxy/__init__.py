"""turnout: switch HTTP traffic between immutable versions of a service."""

__version__ = "0.1.0"


def data_plane_build() -> str:
    """"compiled (mypyc)" when the per-request modules are C extensions (see setup.py), else "pure Python"."""
    from proxy.dataplane import downstream

    return "compiled (mypyc)" if downstream.__file__.endswith((".so", ".pyd")) else "pure Python"
