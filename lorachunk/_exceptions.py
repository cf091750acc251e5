r"""The exceptions lorachunk raises.

Every error the library raises on purpose derives from :class:`LorachunkError`, and also from
the builtin a caller would naturally catch, so ``except ValueError`` and ``except OSError`` keep
working::

    LorachunkError(Exception)
    ├── FormatError(ValueError)            the input file is not a valid safetensors file
    ├── ManifestError(ValueError)          a manifest is malformed, over a limit, or of an unknown format
    ├── IntegrityError(ValueError)         bytes do not match the digest or root that pins them
    ├── UsageError(ValueError)             an option names something that does not exist or matches nothing
    └── StoreError(OSError)                a store could not read or write an object
        ├── ObjectNotFoundError(FileNotFoundError)  an object (pack, manifest, ref) is missing from the store
        ├── RepositoryNotFoundError(FileNotFoundError)  a Hub repo or revision does not exist (or is not visible)
        ├── AuthenticationError(PermissionError)    the credentials were refused (401/403)
        ├── StoreUnavailableError                   the store did not answer usefully (network, 5xx, 429)
        └── StoreLockedError                        another writer holds the lock a write or repack needs

Foreign exceptions (``OSError`` from the file system, ``zstd.ZstdError``, ``json.JSONDecodeError``,
``httpx.HTTPError`` …) are converted where they enter, with ``raise … from exc``.

Two warnings (``UserWarning``\ s): :class:`CacheWarning`, when the cache cannot be written and a
load goes on without it; :class:`BaseModelWarning`, when compose mixes LoRAs that say they are
for different base models.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "BaseModelWarning",
    "CacheWarning",
    "FormatError",
    "IntegrityError",
    "LorachunkError",
    "ManifestError",
    "ObjectNotFoundError",
    "RepositoryNotFoundError",
    "ShardNotFoundError",
    "StoreError",
    "StoreLockedError",
    "StoreUnavailableError",
    "UsageError",
]


class LorachunkError(Exception):
    """Root of every error lorachunk raises on purpose."""


class FormatError(LorachunkError, ValueError):
    """The input is not a valid safetensors file (truncated, bad header, bad offsets, …)."""


class ManifestError(LorachunkError, ValueError):
    """A manifest is malformed, exceeds a reader limit, or has a format id this version refuses."""


class IntegrityError(LorachunkError, ValueError):
    """Bytes do not hash to the digest (or Merkle root) that pins them."""


class UsageError(LorachunkError, ValueError):
    """An option is invalid: an unknown split or module, a glob that matches nothing, a bad value."""


class StoreError(LorachunkError, OSError):
    """A store could not read or write an object."""


class ObjectNotFoundError(StoreError, FileNotFoundError):
    """The store has no object under the requested key."""


#: The name before 0.3 (records were "shards" then); kept for one release.
ShardNotFoundError = ObjectNotFoundError


class RepositoryNotFoundError(StoreError, FileNotFoundError):
    """A Hub repository or revision does not exist, or the credentials given cannot see it."""


class AuthenticationError(StoreError, PermissionError):
    """The server refused the credentials (HTTP 401 or 403). The token is never in the message."""


class StoreUnavailableError(StoreError):
    """The store did not answer usefully: connection failures, timeouts, 429 or 5xx after retries."""


class CacheWarning(UserWarning):
    """The cache could not be written (read-only, full, a file in its place); the load went on without it."""


class StoreLockedError(StoreError):
    """Another program holds the store's lock: a repack beside a writer, or a writer that waited
    for a repack past its limit. The message names the holder (command, pid, host, since when)."""


class BaseModelWarning(UserWarning):
    """LoRAs trained for different base models (SD 1.5 and SD 2, say) are being composed into one."""
