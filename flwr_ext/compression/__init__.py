"""Update compression for Flower: codecs, presets, a client mod and a server wrapper.

Quick start::

    # client_app.py
    app = ClientApp(mods=[compression_mod("fedzip")])
    # server_app.py
    strategy = Compressed(FedAvg(...))                      # uplink only
    strategy = Compressed(FedAvg(...), downlink="fedzip")   # both ways (EF21-P shadows)

See ``docs/compression.md`` for the presets and the wire format.
"""

from .accounting import ByteCounter, ByteEvent, record_bytes, write_update_bytes
from .codec import (
    DEFAULT_MAX_ELEMENTS,
    PipelineConfig,
    decode_tensor,
    encode_tensor,
    encode_update,
)
from .downlink import DownlinkState, downlink_config
from .ef21 import ef21_mod
from .errors import (
    CompressionError,
    ConfigError,
    CorruptPayloadError,
    PayloadLimitError,
    UnsupportedVersionError,
)
from .feedback import CompressionState, DGCConfig, compress
from .mod import compression_mod
from .presets import PRESETS, get_preset, parse_spec
from .scafcom import scafcom_mod
from .server import (
    Compressed,
    MissingDownlinkModError,
    decode_arrays,
    decode_reply,
    is_compressed,
    support_mean,
)

__all__ = [
    "DEFAULT_MAX_ELEMENTS",
    "PRESETS",
    "ByteCounter",
    "ByteEvent",
    "Compressed",
    "CompressionError",
    "CompressionState",
    "ConfigError",
    "CorruptPayloadError",
    "DGCConfig",
    "DownlinkState",
    "MissingDownlinkModError",
    "PayloadLimitError",
    "PipelineConfig",
    "UnsupportedVersionError",
    "compress",
    "compression_mod",
    "decode_arrays",
    "decode_reply",
    "decode_tensor",
    "downlink_config",
    "ef21_mod",
    "encode_tensor",
    "encode_update",
    "get_preset",
    "is_compressed",
    "parse_spec",
    "scafcom_mod",
    "record_bytes",
    "support_mean",
    "write_update_bytes",
]
