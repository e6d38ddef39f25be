"""Training-free token selectors (uniform, random, FastV, VisionZip, DivPrune), the CaCoVID selector and the oracle."""

from cacovid_rl.baselines.base import ORACLE, SELECTORS, SelectionContext, TokenSelector, budget, get_selector

__all__ = ["ORACLE", "SELECTORS", "SelectionContext", "TokenSelector", "budget", "get_selector"]
