"""PrivAds: a streaming, online-learning, privacy-preserving ad recommender.

The checkout's top-level folders are this package's subpackages, in layers
that import only downwards (``docs/architecture.md``; enforced by ``.importlinter``):

``cli`` → ``bench`` → ``api`` → ``learner`` → ``streams`` → ``ranker`` → ``infra``
"""

__version__ = "0.1.0"
