"""The one error of `fleet.pki`: a request the site cannot satisfy."""

from common.errors import EdgeError


class PkiError(EdgeError):
    """A request the site cannot satisfy (missing CA, bad name, refused overwrite, ...)."""
