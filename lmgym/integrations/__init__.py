"""Bridges from lmgym tasks to other training libraries (each behind an optional extra).

- :mod:`lmgym.integrations.trl`: Hugging Face TRL's online trainers (``GRPOTrainer``, ``RLOOTrainer``)
  on any lmgym task; ``pip install 'lmgym[trl]'``.

Stable-Baselines3 needs no bridge module of its own here: it trains on the Gymnasium environments
directly (``lmgym.agents.sb3``).
"""
