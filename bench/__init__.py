"""Benches, the simulator, the simulated audience, peer policies and load generators. The runtime never imports
this package; it needs the bench extra (vowpalwabbit, matplotlib).
"""

if __name__ != "privads.bench":  # imported as a top-level package from the checkout: two copies of every module
    raise ImportError(f"import privads.bench, not {__name__}: the checkout's folders are the privads package")
