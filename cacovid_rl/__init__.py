"""cacovid-rl: contribution-aware video-token compression policies trained with RL.

The library is pure torch/transformers and never imports Ray; ``actors/`` and ``learner/`` add the
distribution layer.
"""

__version__ = "0.1.0"
