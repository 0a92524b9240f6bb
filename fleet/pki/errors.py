"""The one error of `fleet.pki`: a request the site cannot satisfy."""


class PkiError(Exception):
    """A request the site cannot satisfy (missing CA, bad name, refused overwrite, ...)."""
