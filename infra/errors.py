"""PrivAds' exceptions: one hierarchy, each message naming what is wrong.

Every layer raises these; only ``api/`` turns them into HTTP answers
(``api.main``: ``InvalidInput`` → 422, ``Forbidden`` → 403, ``NotFound`` → 404, ``Unavailable`` → 503)
and only ``cli/`` into an exit status and one line on stderr.

::

    PrivAdsError
    ├── InvalidInput (ValueError)      bad input, named: an event, a log file, an argument
    │   ├── InvalidEvent               a message that cannot be decoded or validated (dead-lettered)
    │   └── LogError                   a log file that cannot be read as asked
    ├── Forbidden (PermissionError)    well-formed but not allowed (a click on another's impression)
    ├── NotFound (LookupError)         something named does not exist (a model version)
    ├── Unavailable (ConnectionError)  a backend or a peer cannot be reached or answered nonsense
    │   └── HttpProtocolError          the load generator could not frame a server's HTTP response
    ├── Conflict                       a fenced write lost its race: re-read and re-plan
    ├── Misconfigured (RuntimeError)   the settings contradict what runs (a topic's partition count)
    └── StartError (RuntimeError)      a child process did not start or become ready
"""

from __future__ import annotations


class PrivAdsError(Exception):
    """Base of every error PrivAds raises on purpose."""


class InvalidInput(PrivAdsError, ValueError):
    """Input that PrivAds refuses; the text names the field, line or argument and what is wrong with it."""


class InvalidEvent(InvalidInput):
    """A message that cannot be decoded or validated; the text names what is wrong."""


class LogError(InvalidInput):
    """A log that cannot be read as asked; the text names the file and what is wrong."""


class Forbidden(PrivAdsError, PermissionError):
    """A well-formed request that is not allowed (a click naming an impression not served to its user and ad)."""


class NotFound(PrivAdsError, LookupError):
    """Something asked for by name (a model version, a file) does not exist."""


class Unavailable(PrivAdsError, ConnectionError):
    """A backend or a peer cannot be reached now, or answered what cannot be understood; retry later."""


class HttpProtocolError(Unavailable):
    """The server's bytes could not be framed as an HTTP/1.1 response; the connection is dropped."""


class Conflict(PrivAdsError):
    """Another writer changed a partition since it was read; the batch must be re-planned."""


class Misconfigured(PrivAdsError, RuntimeError):
    """The settings contradict the running system (a topic's partition count); the text says how to fix it."""


class StartError(PrivAdsError, RuntimeError):
    """A child failed to start or to become ready; the text says which and why."""
