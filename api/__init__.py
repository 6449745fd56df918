"""HTTP API (FastAPI): one router per resource over ranker.service.Recommender."""

if __name__ != "privads.api":  # imported as a top-level package from the checkout: two copies of every module
    raise ImportError(f"import privads.api, not {__name__}: the checkout's folders are the privads package")
