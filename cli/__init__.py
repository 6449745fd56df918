"""The privads command line and the privads up supervisor. Nothing imports this package."""

if __name__ != "privads.cli":  # imported as a top-level package from the checkout: two copies of every module
    raise ImportError(f"import privads.cli, not {__name__}: the checkout's folders are the privads package")
