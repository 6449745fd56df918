"""Foundation: settings, Redis key layout, event records, Kafka and Redis I/O, processes. Imports no other PrivAds
package.
"""

if __name__ != "privads.infra":  # imported as a top-level package from the checkout: two copies of every module
    raise ImportError(f"import privads.infra, not {__name__}: the checkout's folders are the privads package")
