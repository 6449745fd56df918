"""Maths and serving: posterior updates, scoring, Thompson sampling and propensities, features, the ranker net, the
FAISS catalog, the ad encoder and projector, versioned artifacts, A/B arms; the serving Recommender.
"""

if __name__ != "privads.ranker":  # imported as a top-level package from the checkout: two copies of every module
    raise ImportError(f"import privads.ranker, not {__name__}: the checkout's folders are the privads package")
