"""Training-free token selectors (uniform, random, FastV, VisionZip, DivPrune) and the CaCoVID selector."""

from cacovid_rl.baselines.base import SELECTORS, SelectionContext, TokenSelector, budget, get_selector

__all__ = ["SELECTORS", "SelectionContext", "TokenSelector", "budget", "get_selector"]
