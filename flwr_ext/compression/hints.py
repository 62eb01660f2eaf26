"""Say what to do when compressed replies reach a strategy that cannot decode them.

:func:`~flwr_ext.compression.compression_mod` replaces the clients' train replies by
``Array(stype="flwr-ext/<codec>")`` payloads. Only :class:`~flwr_ext.compression.Compressed`
(around a Flower strategy) and flwr-ext's asynchronous engine decode them. A plain Flower
strategy (``FedAvg`` without the wrapper) calls ``Array.numpy()`` while aggregating, and Flower
1.42 raises, deep inside ``flwr/serverapp/strategy/strategy_utils.py``::

    TypeError: Unsupported serialization type for numpy conversion: 'flwr-ext/fedzip'

Two pieces turn that into an error that says what to do:

* on the server, :func:`explain_missing_decoder` (a context manager around ``strategy.start``)
  and :func:`missing_decoder_error` (for an exception already caught) re-raise it as
  :class:`MissingDecoderError` naming the codec and the fix; :func:`check_decodable` refuses such
  replies before a strategy aggregates them;
* on the client, a handshake: whatever decodes puts :data:`DECODER_KEY` in the train config it
  sends (:func:`announce_decoder`); the client mod asks :func:`server_decodes` before encoding,
  and without it can refuse with :data:`HINT` as the error reply's reason, which Flower's own
  strategies log on the server ("Received error in reply from node ..."). That covers a user's
  own ServerApp, where no flwr-ext code runs on the server.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator

from flwr.app import ConfigRecord, Message

from .codec import STYPE_PREFIX
from .errors import CompressionError

#: Train-config key set by every decoder of compressed replies (``Compressed``, the async
#: engine): clients may compress only when the train message carries it.
DECODER_KEY = "flwr-ext.decodes-compressed"

HINT = (
    "the clients' compression_mod sends compressed train replies (Array stype 'flwr-ext/...') "
    "but the server strategy does not decode them: wrap the strategy in Compressed, e.g. "
    "`from flwr_ext.compression import Compressed; strategy = Compressed(FedAvg(...))` "
    "(flwr-ext's async strategies decode by themselves), or set the run-config key "
    "compression='none'"
)

_FLOWER_MESSAGE = re.compile(
    r"Unsupported serialization type for numpy conversion: '("
    + re.escape(STYPE_PREFIX)
    + r"[^']*)'"
)


class MissingDecoderError(CompressionError, TypeError):
    """Compressed replies reached a strategy that cannot decode them (see :data:`HINT`).

    A ``TypeError``, like the error Flower raises for them, so code that catches that keeps
    working.
    """

    def __init__(self, stype: str) -> None:
        self.stype = stype
        super().__init__(f"cannot aggregate {stype!r} arrays: {HINT}")


def missing_decoder_error(exc: BaseException) -> MissingDecoderError | None:
    """The :class:`MissingDecoderError` for Flower's error on a flwr-ext payload, else ``None``."""
    if isinstance(exc, MissingDecoderError):
        return exc
    if not isinstance(exc, TypeError):
        return None
    m = _FLOWER_MESSAGE.search(str(exc))
    return MissingDecoderError(m.group(1)) if m else None


@contextlib.contextmanager
def explain_missing_decoder() -> Iterator[None]:
    """Re-raise Flower's error on an undecoded flwr-ext payload as :class:`MissingDecoderError`.

    Use it around ``strategy.start(...)`` (or a whole ServerApp ``main``); any other exception
    passes through unchanged.
    """
    try:
        yield
    except TypeError as exc:
        err = missing_decoder_error(exc)
        if err is None or err is exc:
            raise
        raise err from exc


def compressed_stype(message: Message) -> str | None:
    """The first ``flwr-ext/`` stype in a reply's ArrayRecords, or ``None``."""
    if message.has_error() or not message.has_content():
        return None
    for record in message.content.array_records.values():
        for arr in record.values():
            if arr.stype.startswith(STYPE_PREFIX):
                return arr.stype
    return None


def check_decodable(replies: Iterable[Message]) -> None:
    """Raise :class:`MissingDecoderError` if any reply still holds a flwr-ext payload."""
    for msg in replies:
        stype = compressed_stype(msg)
        if stype is not None:
            raise MissingDecoderError(stype)


def announce_decoder(config: ConfigRecord) -> ConfigRecord:
    """Mark a train config as sent by a server that decodes compressed replies (in place)."""
    config[DECODER_KEY] = True
    return config


def announce(message: Message) -> Message:
    """Mark every config record of a train message (adding one if it has none), in place."""
    if not message.content.config_records:
        message.content[DECODER_KEY] = ConfigRecord()
    for record in message.content.config_records.values():
        announce_decoder(record)
    return message


def server_decodes(message: Message) -> bool:
    """Whether a train message says its sender decodes compressed replies."""
    if not message.has_content():
        return False
    return any(bool(rec.get(DECODER_KEY, False)) for rec in message.content.config_records.values())
