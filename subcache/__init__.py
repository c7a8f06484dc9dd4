"""subcache: SubTuning from a cache of frozen-prefix activations.

Run the frozen part of a pretrained backbone once, store the activations at the input of the first tuned block as
a chunked, compressed Zarr array, and train only the chosen blocks plus a new head from there.
"""
from ._version import __version__  # noqa: E402,F401

import pathlib as _pathlib

# The command line lives in the repository's cli/ folder and installs as subcache.cli (setup.cfg's package_dir);
# from a source checkout (PYTHONPATH, editable installs) subcache.cli is found there too.
if not (_pathlib.Path(__file__).parent / "cli").is_dir() and (_pathlib.Path(__file__).parents[1] / "cli").is_dir():
    __path__.append(str(_pathlib.Path(__file__).parents[1]))  # noqa: F821 - a package's own __path__

from .backbones import Backbone, BlockInfo, Preprocess, describe_blocks, load_backbone, parse_block_spec  # noqa: E402
from .build import BuildConfig, BuildResult, build_cache  # noqa: E402
from .data import ImageSource, open_source  # noqa: E402
from .errors import *  # noqa: E402,F401,F403
from .store import Cache, open_cache  # noqa: E402
from .info import cache_info  # noqa: E402
from .task import Task, load_task, save_task  # noqa: E402
from .train import TrainConfig, TrainData, TrainResult, train  # noqa: E402
from .evaluation import evaluate, evaluate_task  # noqa: E402
from .tuned import TunedModel  # noqa: E402
from .derive import DeriveConfig, derive_cache  # noqa: E402
from .selection import (GreedyConfig, ProfileConfig, RankConfig, greedy_search, greedy_select,  # noqa: E402
                        profile_blocks, rank_windows, SelectConfig, select_window)
from .active import ALConfig, ALResult, PoolScores, active_learning, compare_strategies, score_pool  # noqa: E402
from .labels import add_labels  # noqa: E402
from .multitask import MultiTaskModel, Predictions, predict  # noqa: E402
from .trust import allow_factories  # noqa: E402

__all__ = [
    # backbones and data
    "Backbone", "BlockInfo", "Preprocess", "describe_blocks", "load_backbone", "parse_block_spec", "ImageSource",
    "open_source",
    # the cache
    "BuildConfig", "BuildResult", "build_cache", "DeriveConfig", "derive_cache", "Cache", "open_cache",
    "cache_info", "add_labels",
    # training and tasks
    "TrainConfig", "TrainData", "TrainResult", "train", "evaluate", "evaluate_task", "TunedModel", "Task", "load_task",
    "save_task",
    # many runs on one cache
    "ProfileConfig", "profile_blocks", "RankConfig", "rank_windows", "GreedyConfig", "greedy_search", "greedy_select",
    "SelectConfig", "select_window", "ALConfig", "ALResult",
    "PoolScores", "active_learning", "compare_strategies", "score_pool",
    # deployment
    "MultiTaskModel", "Predictions", "predict",
    # trust
    "allow_factories",
]
