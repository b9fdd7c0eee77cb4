"""The console of a search: one progress bar per search on a terminal, one plain line per finished trial off one
(a pipe, CI, a Ray job's log: tests and people read those lines), and the libraries' banners off unless the user
asks for them (`--verbose`).

On a terminal the bar (trials done, pruned, failed, the spend, the hypervolume, an ETA) stays on the last line
and every other line of the driver, a trial's own included, is written above it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib import DummyTqdmFile

from safemerge.search.budget import Spend, format_spend
from safemerge.search.config import SearchConfig

# Set by `quiet_libraries(verbose=True)`; read by the driver (Tune's verbosity, Ray's log forwarding) and inherited
# by the processes it starts, so a Ray job or a worker sees the same choice.
VERBOSE_ENV = "SAFEMERGE_VERBOSE"
# What the workers run with unless --verbose: vLLM's INFO lines (engine start, every reload) off, its warnings and
# errors kept. A user's own setting wins.
QUIET_WORKER_ENV = {"VLLM_LOGGING_LEVEL": "WARNING"}
# What the driver runs with unless --verbose (a user's own setting wins): Tune's older console engine, which at
# verbosity 0 prints nothing (the newer one prints its experiment box and TensorBoard hint at every verbosity);
# MLflow without its "View run ... / View experiment ..." lines after each run it ends, its INFO lines and its
# artifact download bars.
QUIET_DRIVER_ENV = {
    "RAY_AIR_NEW_OUTPUT": "0",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}
# Ray's own default for a new local cluster (token authentication, a token made if none is there), set before Ray
# is imported so that Ray does not warn that it chose it. Never for a cluster the driver joins (RAY_ADDRESS).
LOCAL_RAY_ENV = {"RAY_AUTH_MODE": "token"}


def quiet_libraries(verbose: bool = False) -> None:
    """Turn the libraries' routine output off (or leave it on with `verbose`): Ray Tune's experiment box, status
    tables and TensorBoard hint, Ray's notice that a new local cluster uses token authentication, Optuna's info
    lines and experimental-feature warnings, MLflow's run links, INFO lines and download bars, and (through
    `worker_env` and the driver's `log_to_driver`) vLLM's info lines and the workers' forwarded output. Called by
    a command before it imports Ray."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        return
    os.environ.pop(VERBOSE_ENV, None)
    for name, value in {**QUIET_DRIVER_ENV, **QUIET_WORKER_ENV}.items():
        os.environ.setdefault(name, value)
    if "ray" not in sys.modules and not os.environ.get("RAY_ADDRESS"):
        for name, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(name, value)
    # Logging a merged local folder in the transformers flavour warns that it has no hub model card and no
    # licence: true of every merge, and nothing the user can act on.
    logging.getLogger("mlflow.transformers").setLevel(logging.ERROR)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # Optuna marks multi-objective TPE, the GP and NSGA-III samplers and its heartbeat as experimental: a warning
    # per search, about Optuna's API, not about the user's search.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def libraries_verbose() -> bool:
    """Whether the user asked for the libraries' own output (`--verbose`)."""
    return os.environ.get(VERBOSE_ENV) == "1"


def worker_env() -> dict[str, str]:
    """Environment variables the worker actors start with: vLLM quiet unless --verbose (a user's own wins)."""
    if libraries_verbose():
        return {}
    return {name: os.environ.get(name, value) for name, value in QUIET_WORKER_ENV.items()}


def format_eta(seconds: float | None) -> str:
    return "ETA ?" if seconds is None else f"ETA {tqdm.format_interval(max(0.0, seconds))}"


@dataclass(frozen=True)
class Tally:
    """Where a search stands: its trials finished (`done`, all drivers), pruned and failed, its spend, its
    hypervolume, and an estimate of the seconds left (None until a trial finished in this driver)."""

    done: int
    pruned: int
    failed: int
    spend: Spend
    hypervolume: float
    eta_s: float | None


def bar_text(config: SearchConfig, tally: Tally) -> str:
    """What the bar shows beside itself: `3/12 done | pruned 1 | failed 0 | hypervolume 0.4567 | tokens 9,000 |
    1.2 min | ETA 03:30`."""
    return (
        f"{tally.done}/{config.trials} done | pruned {tally.pruned} | failed {tally.failed} | "
        f"hypervolume {tally.hypervolume:.4f} | {format_spend(config, tally.spend)} | {format_eta(tally.eta_s)}"
    )


class Estimate:
    """The seconds a search has left at this driver's pace: until the first budget limit it reaches (trials,
    generated tokens or minutes), from what finished since this driver started with the spend `start`."""

    def __init__(self, config: SearchConfig, start: Spend, clock: Callable[[], float] = time.monotonic) -> None:
        self.config, self.start, self.clock = config, start, clock
        self.started = clock()

    def seconds_left(self, done: int, spend: Spend) -> float | None:
        """With `done` trials finished and `spend` spent; None until a trial finished in this driver."""
        elapsed = self.clock() - self.started
        finished_here = done - self.start.trials
        if finished_here <= 0 or elapsed <= 0:
            return None
        budget = self.config.budget
        left = [elapsed / finished_here * max(0, self.config.trials - done)]
        tokens_here = spend.generated_tokens - self.start.generated_tokens
        if budget.generated_tokens is not None and tokens_here > 0:
            left.append(elapsed / tokens_here * max(0, budget.generated_tokens - spend.generated_tokens))
        if budget.minutes is not None:
            left.append(max(0.0, budget.minutes * 60 - spend.seconds))
        return min(left)


class SearchConsole:
    """The console of one search. `trial_finished` takes a trial's line and where the search stands; `say` any
    other line. With a bar (a terminal), lines go above it; without, they are printed as they come."""

    def __init__(
        self,
        config: SearchConfig,
        start: Spend,
        log: Callable[[str], None] = print,
        bar: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config, self.log = config, log
        # A caller that collects the lines itself (a test, compare's log) gets lines; the bar is for a person.
        self.wants_bar = (log is print and sys.stdout.isatty()) if bar is None else bar
        self.estimate = Estimate(config, start, clock)
        self.tally = Tally(start.trials, 0, 0, start, 0.0, None)
        self.bar: tqdm | None = None
        self.terminal = sys.stdout

    def say(self, line: str) -> None:
        if self.bar is not None:
            tqdm.write(line, file=self.terminal)
        else:
            self.log(line)

    def trial_finished(self, line: str, done: int, pruned: int, failed: int, spend: Spend, volume: float) -> None:
        self.tally = Tally(done, pruned, failed, spend, volume, self.estimate.seconds_left(done, spend))
        self.say(line)
        if self.bar is not None:
            self.bar.set_description_str(bar_text(self.config, self.tally), refresh=False)
            self.bar.update(done - self.bar.n)
            self.bar.refresh()

    @contextlib.contextmanager
    def showing(self) -> Iterator[None]:
        """The bar, while the search runs: everything printed meanwhile (the driver's lines, the MLflow mirror's,
        a library's) goes above it. Without a bar, nothing changes."""
        if not self.wants_bar:
            yield
            return
        self.terminal = terminal = sys.stdout
        name = self.config.name.replace("{", "{{").replace("}", "}}")
        self.bar = tqdm(
            total=self.config.trials,
            initial=self.tally.done,
            desc=bar_text(self.config, self.tally),
            bar_format=f"{name} |{{bar}}| {{desc}}",
            file=terminal,
            dynamic_ncols=True,
            leave=True,
        )
        try:
            with contextlib.redirect_stdout(DummyTqdmFile(terminal)):
                yield
        finally:
            self.bar.close()
            self.bar = None


def mlflow_location(config: SearchConfig, run_url: str) -> str:
    """Where a person finds a search's parent run: its URL on an MLflow server; for a store on disk (sqlite), the
    command that serves it, with the store's absolute path (a sqlite path with a URL fragment opens nothing)."""
    tracking_uri = config.mlflow.tracking_uri
    if not tracking_uri.startswith("sqlite:///") or run_url.startswith("not yet created"):
        return run_url
    path = Path(tracking_uri.removeprefix("sqlite:///")).absolute()
    return (
        f"{config.name!r} in experiment {config.mlflow.experiment!r}; browse it with "
        f"`mlflow ui --backend-store-uri sqlite:///{path}`"
    )
