"""The autotuner: search pass orders and pass configs against accuracy, latency and size.

    space.py       stages (order grammar) + each pass's config domains, from a YAML file
    order.py       legal orders: the passes' after/before constraints as a networkx DAG
    strategies.py  exhaustive, random, greedy, optuna TPE / NSGA-II
    objectives.py  accuracy (eval function or fidelity), latency and size ratios, Pareto
    cache.py       intermediate models keyed by the sha256 chain; prefix reuse
    evaluate.py    what a worker does for one candidate (build, proxy check, accuracy)
    lane.py        latency, timed one candidate at a time
    executors.py   local process pool, Ray
    api.py         `search(...)`: the driver; report.py: the outputs
"""

from slimgraph.search.api import SearchResult, search
from slimgraph.search.candidate import Candidate
from slimgraph.search.space import Space, SpaceError, load_space

__all__ = ["Candidate", "SearchResult", "Space", "SpaceError", "load_space", "search"]
