"""The errors fedskin reports as one line naming what is at fault; imports nothing.

At the bottom of ``common``: the run config (common/config.py), the data pipeline
(common/data/), the run directory (common/rundir.py) and the site's own rules
(client/siteconfig.py) raise them without importing one another.
"""

from __future__ import annotations


class DataError(ValueError):
    """Bad input found while loading: the message names the file or row at fault."""


class ConfigError(DataError):
    """A run config that is not allowed; the message is one line naming the key at fault."""


class SiteConfigError(DataError):
    """A setting the site refuses; the message is one line."""
