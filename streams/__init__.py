"""Stream workers: batch agents that join clicks to impressions, learn user posteriors, count per-ad evidence and
archive events.
"""

if __name__ != "privads.streams":  # imported as a top-level package from the checkout: two copies of every module
    raise ImportError(f"import privads.streams, not {__name__}: the checkout's folders are the privads package")
