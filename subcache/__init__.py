"""subcache: SubTuning from a cache of frozen-prefix activations.

Run the frozen part of a pretrained backbone once, store the activations at the input of the first tuned block as
a chunked, compressed Zarr array, and train only the chosen blocks plus a new head from there.
"""
from ._version import __version__  # noqa: F401

from .backbones import Backbone, BlockInfo, Preprocess, describe_blocks, load_backbone, parse_block_spec
from .build import BuildConfig, BuildResult, build_cache
from .data import ImageSource, open_source
from .errors import *  # noqa: F401,F403
from .store import Cache, open_cache
from .info import cache_info
from .task import Task, load_task, save_task
from .train import TrainConfig, TrainData, TrainResult, train
from .evaluation import evaluate, evaluate_task
from .tuned import TunedModel
from .derive import DeriveConfig, derive_cache
from .selection import (GreedyConfig, ProfileConfig, RankConfig, greedy_search, greedy_select,
                        profile_blocks, rank_windows, SelectConfig, select_window)
from .active import ALConfig, ALResult, PoolScores, active_learning, compare_strategies, score_pool
from .labels import add_labels
from .multitask import MultiTaskModel, Predictions, predict
from .trust import allow_factories

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
