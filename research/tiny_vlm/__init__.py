"""The recipe that builds and trains the shipped tiny video LLM (``cacovid_rl/assets/tiny_vlm``).

Run from a source checkout: ``python -m research.tiny_vlm.train --out <dir>`` (docs/TINY_VLM.md explains the
recipe and why it is what it is). Modules: ``model`` (build, save, load), ``scenes`` (curriculum scenes),
``data`` (scenes and splits as tensors, training batches), ``settings`` (the shipped run's settings),
``losses`` (the auxiliary attention loss and the pruned-input loss), ``evaluation`` (accuracy through the
library's adapter and selectors), ``training`` (both phases), ``train`` (the command line).
"""
