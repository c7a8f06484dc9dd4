"""Choosing which blocks to tune, all from one cache: the finetuning profile (every window), successive halving,
the talk's greedy procedure, and `rank`'s training-free proxies — with the windows they share, the FLOP accounting
that makes their costs comparable; each method draws its own figure."""
from .flops import forward_flops, profile_flops, training_flops
from .greedy import GreedyConfig, GreedyResult, greedy_search, greedy_select
from .halving import HalvingResult, halving_profile
from .profile import plot_profile, profile_blocks
from .rank import RankConfig, RankResult, rank_windows
from .select import SelectConfig, SelectResult, select_window
from .runs import ProfileConfig, ProfileResult, load_profile
from .windows import parse_range, spec_of, validation_split, windows

__all__ = ["forward_flops", "profile_flops", "training_flops", "GreedyConfig", "GreedyResult", "greedy_search",
           "greedy_select", "HalvingResult", "halving_profile", "plot_profile", "profile_blocks", "RankConfig",
           "RankResult", "rank_windows", "SelectConfig", "SelectResult", "select_window", "ProfileConfig",
           "ProfileResult", "load_profile", "parse_range", "spec_of", "validation_split", "windows"]
