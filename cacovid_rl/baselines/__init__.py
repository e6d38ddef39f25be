"""Training-free video-token compression methods behind one interface, the CaCoVID selector and the oracle.

Selectors (kept indices): uniform, random, FastV, VisionZip, DivPrune, VidCom2, the CaCoVID policy, the oracle.
Mergers (averaged tokens at chosen positions): PruneVid, FrameFusion, FlashVID, FastVID. ``get_method(name)``
builds any of them and ``compress(method, ctx, retention)`` returns the compressed video block of any of them
(see ``base.py``). Importing this package registers every method (``registry.py``).
"""

from cacovid_rl.baselines import (  # noqa: F401  (imported to register the methods)
    cacovid,
    divprune,
    fastv,
    fastvid,
    flashvid,
    framefusion,
    oracle,
    prunevid,
    random_select,
    uniform,
    vidcom2,
    visionzip,
)
from cacovid_rl.baselines.base import (
    ORACLE,
    CompressedVideo,
    SelectionContext,
    TokenCompressor,
    TokenSelector,
    budget,
    build_block,
    compress,
    from_keep,
)
from cacovid_rl.baselines.registry import get_method, get_selector, registered

SELECTORS: tuple[str, ...] = ("uniform", "random", "fastv", "visionzip", "divprune", "cacovid", "vidcom2")
"""Selection methods that work on any question (the oracle reference needs labelled answer tokens: ``ORACLE``)."""
MERGERS: tuple[str, ...] = ("prunevid", "framefusion", "flashvid", "fastvid")
"""Methods that merge tokens: their block is averaged embeddings at representative positions (no kept indices)."""
METHODS: tuple[str, ...] = SELECTORS + MERGERS
"""Every method usable in ``eval.baselines`` (plus ``ORACLE`` where the records label the answer tokens)."""
NEEDS_ATTENTION: tuple[str, ...] = ("fastv", "prunevid", "framefusion")
"""Methods that ask the adapter for early-layer LLM attention (``SelectionContext.adapter``)."""

assert set(METHODS) | {ORACLE} == set(registered()), "every registered method is listed, and only those"

__all__ = [
    "MERGERS",
    "METHODS",
    "NEEDS_ATTENTION",
    "ORACLE",
    "SELECTORS",
    "CompressedVideo",
    "SelectionContext",
    "TokenCompressor",
    "TokenSelector",
    "budget",
    "build_block",
    "compress",
    "from_keep",
    "get_method",
    "get_selector",
]
