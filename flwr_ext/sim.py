"""Run a packaged Flower app from Python, with a run config, on one of two backends.

``flwr.simulation.run_simulation`` starts the real Simulation Engine (Ray) but gives
the apps an empty run config. :func:`run_app` fuses the app's ``pyproject.toml``
defaults with overrides exactly as ``flwr run --run-config`` does and hands the
result to both apps, so the demo, the baselines and the tests run the same app code
with the same configuration semantics as ``flwr run``.

Backends (``run_app(..., backend=...)``, see ``docs/simulation.md``):

``"simulation"``
    Flower's Simulation Engine (Ray). How many ClientApps run at once, in Flower 1.42:
    ``min(actors, min(32, os.cpu_count() + 4))``. Ray builds
    ``actors = floor(Ray CPUs / client_resources.num_cpus)`` (Ray CPUs: ``init_args.num_cpus``,
    default all cores), but the Simulation Engine drives the actors from a
    ``ThreadPoolExecutor()`` with Python's default size, one thread per busy actor
    (``flwr/server/superlink/fleet/vce/vce_api.py``), so actors beyond ``cpu_count + 4`` idle.
    ``max_concurrent`` sets the actor count through the backend config
    (``client_resources.num_cpus = 1``, ``init_args.num_cpus = max_concurrent``); Flower 1.42 has
    no backend-config key for the thread cap.
``"inline"``
    :mod:`flwr_ext.inline`: the same ClientApp and ServerApp objects in this process, no Ray,
    no SuperLink; for virtual-clock runs only (a real clock is refused).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.client_app import LoadClientAppError
from flwr.common.config import get_fused_config_from_dir, get_project_config
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.server_app import LoadServerAppError
from flwr.supercore.object_ref import load_app

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

BACKENDS = ("simulation", "inline")


class ServerAppFailed(RuntimeError):
    """The ServerApp raised (the original exception is the ``__cause__``)."""


class ConfiguredClientApp(ClientApp):
    """A ClientApp that runs ``inner`` with ``run_config`` in its Context."""

    def __init__(self, inner: ClientApp, run_config: dict[str, Any]) -> None:
        super().__init__()
        self._inner = inner
        self._run_config = dict(run_config)

    def __call__(self, message: Message, context: Context) -> Message:
        # Flower checks after each call that the node's run_config is unchanged.
        original = context.run_config
        context.run_config = {**self._run_config, **original}
        try:
            return self._inner(message, context)
        finally:
            context.run_config = original


class ConfiguredServerApp(ServerApp):
    """A ServerApp that runs ``inner`` with ``run_config`` in its Context.

    It remembers what ``inner`` raised (``error``), including ``SystemExit`` and other
    ``BaseException``: Flower's Simulation Engine runs the ServerApp in a thread and catches
    only ``Exception``, so those would otherwise end the run silently.
    """

    def __init__(self, inner: ServerApp, run_config: dict[str, Any]) -> None:
        super().__init__()
        self._inner = inner
        self._run_config = dict(run_config)
        self.error: BaseException | None = None

    def __call__(self, grid: Grid, context: Context) -> None:
        original = context.run_config
        context.run_config = {**self._run_config, **original}
        try:
            self._inner(grid, context)
        except SystemExit as ex:
            if ex.code not in (None, 0):
                self.error = ex
            raise
        except BaseException as ex:
            self.error = ex
            raise
        finally:
            context.run_config = original


def fused_run_config(app_dir: str | Path, overrides: dict[str, Any] | None = None) -> dict:
    """The app's ``[tool.flwr.app.config]`` defaults with ``overrides`` applied."""
    app_dir = Path(app_dir)
    if not (app_dir / "pyproject.toml").is_file():
        raise FileNotFoundError(f"{app_dir} has no pyproject.toml; is it a Flower app?")
    return dict(get_fused_config_from_dir(app_dir, dict(overrides or {})))


def load_components(app_dir: str | Path) -> tuple[ServerApp, ClientApp]:
    """The ServerApp and ClientApp an app's ``[tool.flwr.app.components]`` names.

    Loaded with Flower's own loader (``flwr.supercore.object_ref.load_app``, which puts
    ``app_dir`` on ``sys.path``), as ``flwr run`` does; the app need not be installed.
    """
    app_dir = Path(app_dir).resolve()
    if not (app_dir / "pyproject.toml").is_file():
        raise FileNotFoundError(f"{app_dir} has no pyproject.toml; is it a Flower app?")
    components = get_project_config(app_dir)["tool"]["flwr"]["app"]["components"]
    server_app = load_app(components["serverapp"], LoadServerAppError, app_dir)
    client_app = load_app(components["clientapp"], LoadClientAppError, app_dir)
    if not isinstance(server_app, ServerApp) or not isinstance(client_app, ClientApp):
        raise TypeError(f"{app_dir}: components are not a ServerApp and a ClientApp")
    return server_app, client_app


def simulation_concurrency(num_cpus_per_client: float, ray_cpus: int | None = None) -> int:
    """ClientApps Flower 1.42's Simulation Engine runs at once on one machine.

    ``min(floor(ray_cpus / num_cpus_per_client), min(32, os.cpu_count() + 4))``;
    ``ray_cpus`` defaults to ``os.cpu_count()`` (what Ray detects when ``init_args`` has no
    ``num_cpus``).
    """
    cores = os.cpu_count() or 1
    actors = int((ray_cpus if ray_cpus is not None else cores) / num_cpus_per_client)
    return min(actors, min(32, cores + 4))


def simulation_backend_config(
    num_cpus_per_client: float = 1.0,
    max_concurrent: int | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """The ``backend_config`` for ``run_simulation`` (see the module docstring).

    With ``max_concurrent`` Ray gets ``max_concurrent`` CPUs and each ClientApp one, so it builds
    exactly ``max_concurrent`` actors (``num_cpus_per_client`` is then ignored). Above
    ``os.cpu_count() + 4`` Flower 1.42 still runs only that many at once: refused.
    """
    init_args: dict[str, Any] = {"log_to_driver": verbose, "include_dashboard": False}
    resources = {"num_cpus": num_cpus_per_client, "num_gpus": 0.0}
    if max_concurrent is not None:
        cap = min(32, (os.cpu_count() or 1) + 4)
        if not 1 <= int(max_concurrent) <= cap:
            raise ValueError(
                f"max_concurrent={max_concurrent}: Flower 1.42's Simulation Engine runs at most "
                f"min(32, cpu_count + 4) = {cap} ClientApps at once on this machine (its worker "
                f"ThreadPoolExecutor has Python's default size); choose 1..{cap}"
            )
        resources["num_cpus"] = 1
        init_args["num_cpus"] = int(max_concurrent)
    return {"client_resources": resources, "init_args": init_args}


def run_app(
    server_app: ServerApp,
    client_app: ClientApp,
    *,
    num_supernodes: int,
    run_config: dict[str, Any],
    backend: str = "simulation",
    num_cpus_per_client: float = 1.0,
    max_concurrent: int | None = None,
    node_id_seed: int | None = None,
    inline_workers: int = 0,
    verbose: bool = False,
) -> None:
    """Run ``server_app`` and ``client_app`` on the Simulation Engine (Ray) or inline.

    Parameters
    ----------
    server_app, client_app : ServerApp, ClientApp
        The app's components (:func:`load_components`).
    num_supernodes : int
        Number of simulated SuperNodes.
    run_config : dict
        The complete run config (see :func:`fused_run_config`).
    backend : str
        ``"simulation"`` (Flower's Simulation Engine, Ray) or ``"inline"``
        (:mod:`flwr_ext.inline`; virtual clock only, identical results, no Ray).
    num_cpus_per_client : float
        Simulation Engine: Ray CPUs per ClientApp. At once run
        ``min(floor(CPUs / num_cpus_per_client), min(32, cpu_count + 4))``
        (:func:`simulation_concurrency`).
    max_concurrent : int, optional
        Simulation Engine: run exactly this many ClientApps at once (Ray actors), at most
        ``min(32, cpu_count + 4)``; overrides ``num_cpus_per_client``.
    node_id_seed : int, optional
        Inline: fix the node-id draw (default random per run, as the Simulation Engine).
    inline_workers : int
        Inline: ``0`` (default) calls the ClientApp in this process; ``n > 0`` runs the calls in
        ``n`` warm worker processes, different nodes in parallel (same results).
    verbose : bool
        DEBUG-level Flower logs.

    Raises
    ------
    ServerAppFailed
        If the ServerApp raised (also ``SystemExit`` with a non-zero code, which the Simulation
        Engine's ServerApp thread would swallow); the original exception is its ``__cause__``.
    flwr_ext.inline.RealClockRefused
        With ``backend="inline"`` and a real clock.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; choose one of {', '.join(BACKENDS)}")
    from flwr_ext.inline import RealClockRefused, run_inline

    wrapped = ConfiguredServerApp(server_app, run_config)
    try:
        if backend == "inline":
            run_inline(
                wrapped,
                client_app,
                num_supernodes=num_supernodes,
                run_config=run_config,
                node_id_seed=node_id_seed,
                workers=inline_workers,
            )
        else:
            from flwr.simulation import run_simulation

            run_simulation(
                server_app=wrapped,
                client_app=ConfiguredClientApp(client_app, run_config),
                num_supernodes=num_supernodes,
                backend_config=simulation_backend_config(
                    num_cpus_per_client, max_concurrent, verbose
                ),
                verbose_logging=verbose,
            )
    except BaseException as ex:
        if wrapped.error is None or isinstance(ex, KeyboardInterrupt):
            raise
    _raise_if_failed(wrapped.error, RealClockRefused)


def _raise_if_failed(error: BaseException | None, passthrough: type[BaseException]) -> None:
    if error is None:
        return
    if isinstance(error, passthrough):
        raise error
    raise ServerAppFailed(f"the ServerApp raised {error!r}") from error
