"""The periodic learner (projector and ranker training, the evaluation gate, publication) and offline evaluation
(logs, estimators, replay).
"""

if __name__ != "privads.learner":  # imported as a top-level package from the checkout: two copies of every module
    raise ImportError(f"import privads.learner, not {__name__}: the checkout's folders are the privads package")
