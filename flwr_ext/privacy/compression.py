"""DP and compression: which combinations keep the reported guarantee, derived from who is trusted.

Three set-ups, three answers (the table in docs/privacy.md):

* **Record-level DP-SGD on the client** (local DP-SGD; the server is not trusted with the
  training records). Every weight of the update came out of noised, clipped gradient steps, so
  anything computed from it -- top-k indices, quantised values, the error-feedback residual
  (built from earlier *noised* updates), the payload size -- is post-processing of the DP output
  (Abadi et al. 2016; Dwork & Roth 2014, Prop. 2.1). Every preset is allowed.
* **Client-level central DP with server-side clipping** (:class:`~flwr_ext.privacy.ClientLevelDP`,
  Flower's ``DifferentialPrivacyServerSideFixedClipping``; McMahan et al. 2018). The server is
  trusted: it sees every client's raw update and the guarantee covers only what it releases, the
  sequence of global models. ``Compressed`` decodes each reply first, then the DP wrapper clips
  the decoded update to C and adds noise sized for C, so the sensitivity bound holds whatever
  the compressor sent and however its residual grew. Every preset is allowed: a top-k index set
  tells the trusted server less than the dense update (or a dense QSGD one) would, and the old
  rule that refused top-k here while allowing QSGD had no threat it protected against.
* **Client-side clipping with server noise** (Flower's ``fixedclipping_mod`` +
  ``DifferentialPrivacyClientSideFixedClipping``). The server adds noise sized for C and does
  *not* clip again, so it is only sound if every decoded reply has L2 norm <= C. Compression
  after clipping is not post-processing here: with error feedback the sent vector is
  C(clipped update + residual), whose norm grows with the residual (measured 1.7-2.3 C after 20
  rounds for dgc / fedzip; QSGD's stochastic rounding alone gives 1.004 C). ``compression_mod``
  therefore clips what it sends (it reads the ``clipping_norm`` the server puts in the train
  config and bounds the decoded norm, :func:`flwr_ext.compression.feedback.bounded_encode`). A
  compressor that does not do so is refused.

Not covered by any of these guarantees: the metrics a server logs or returns (train loss,
``num-examples``, byte counts), which are released un-noised.
"""

from __future__ import annotations

from typing import Any


class DPCompressionError(ValueError):
    """A compression set-up that breaks the sensitivity bound a DP guarantee relies on."""


def _pipeline(preset: str | Any | None) -> Any | None:
    if preset is None or isinstance(preset, str) and preset in ("", "none"):
        return None
    if isinstance(preset, str):
        from flwr_ext.compression.presets import get_preset

        return get_preset(preset)
    return preset


def check_dp_compression(
    preset: str | Any | None,
    *,
    record_level: bool,
    client_level: bool = False,
    client_side_clipping: bool = False,
    clips_after_compression: bool = True,
) -> None:
    """Refuse a compression set-up whose decoded updates could exceed the DP sensitivity bound.

    Parameters
    ----------
    preset : str, PipelineConfig or None
        A name from ``flwr_ext.compression.presets.PRESETS`` (or a ``PipelineConfig``).
    record_level : bool
        Record-level DP-SGD runs on the client before compression (the update is DP already).
    client_level : bool
        Client-level central DP with server-side clipping after decoding (``ClientLevelDP``):
        allowed with every preset, see the module notes.
    client_side_clipping : bool
        Client-side fixed clipping with noise added at the server, which does not clip again.
    clips_after_compression : bool
        Whether the compressor bounds the decoded L2 norm of what it sends by the clipping norm
        (``compression_mod`` does whenever the server sends ``clipping_norm``).

    Raises
    ------
    DPCompressionError
        Client-side clipping without record-level DP-SGD and a compressor that does not clip
        after compressing.
    """
    del client_level  # central DP with server-side clipping: every preset keeps the bound
    pipeline = _pipeline(preset)
    if pipeline is None or record_level:
        return  # nothing to check, or post-processing of DP-SGD's output
    if client_side_clipping and not clips_after_compression:
        raise DPCompressionError(
            f"compression preset {getattr(pipeline, 'name', preset)!r} after client-side "
            "fixed clipping: the server adds noise sized for the clipping norm C and does not "
            "clip again, but error feedback and stochastic rounding send vectors of norm above "
            "C (the residual grows round after round), so the noise no longer covers the "
            "sensitivity. Use flwr_ext's compression_mod (it bounds the decoded norm by the "
            "clipping_norm the server sends), clip on the server "
            "(ClientLevelDP / DifferentialPrivacyServerSideFixedClipping, which clip after "
            "decoding), or add record-level DP-SGD (dp.target-epsilon)."
        )
