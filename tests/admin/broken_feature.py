"""A feature module whose own import fails: create_app must surface that, not skip the module."""

import no_such_dependency  # type: ignore[import-not-found]  # noqa: F401
