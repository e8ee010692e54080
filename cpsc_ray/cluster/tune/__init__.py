"""Ray Tune over the engine: the driver (``driver``), one trial (``trial``), the experiment's record
(``record``), the PBT and PB2 schedulers (``schedulers``) and search spaces (``search_space``).

Ray pickles the driver's stopper and callback into an experiment's saved state by their path in this
package, so they are named here too."""

from cpsc_ray.cluster.tune.driver import ComputeBudget, RoundCostWarning, TuneOptions, run_tune
from cpsc_ray.cluster.tune.record import ExperimentRecord
from cpsc_ray.cluster.tune.search_space import (
    SearchSpace,
    SearchSpaceError,
    available_spaces,
    load_search_space,
    search_space_dirs,
)

__all__ = [
    "ComputeBudget",
    "RoundCostWarning",
    "SearchSpace",
    "SearchSpaceError",
    "TuneOptions",
    "ExperimentRecord",
    "available_spaces",
    "load_search_space",
    "run_tune",
    "search_space_dirs",
]
