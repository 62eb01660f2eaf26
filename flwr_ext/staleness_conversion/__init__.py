"""Stale-update conversion by gradient inversion (Wang, Gao et al., unlimited staleness).

* :mod:`.recipe` — :class:`LocalRecipe`, the client's local training the server replays;
* :mod:`.unroll` — ``S(w; D)``, that training unrolled differentiably;
* :mod:`.invert` — learning the synthetic set ``D_rec`` from a stale update;
* :mod:`.convert` — :func:`convert_update`: the fresh update ``S(w^t; D_rec) - w^t`` and its score;
* :mod:`.guards` — refusals (BatchNorm / dropout, DP, secure aggregation);
* :mod:`.compensate` — the baselines (DC-ASGD, ``2^(-tau/20)``).

See docs/staleness_conversion.md.
"""

from flwr_ext.staleness_conversion.compensate import dc_asgd, exp2_weight
from flwr_ext.staleness_conversion.convert import Conversion, convert_update
from flwr_ext.staleness_conversion.guards import ConversionRefused, check_model, check_privacy
from flwr_ext.staleness_conversion.invert import InversionConfig, Reconstruction, invert
from flwr_ext.staleness_conversion.recipe import LocalRecipe
from flwr_ext.staleness_conversion.unroll import unroll

__all__ = [
    "Conversion",
    "ConversionRefused",
    "InversionConfig",
    "LocalRecipe",
    "Reconstruction",
    "check_model",
    "check_privacy",
    "convert_update",
    "dc_asgd",
    "exp2_weight",
    "invert",
    "unroll",
]
