"""l2cluster: regularization studies on MNIST — job specs, regularizer plugins, a stacked trainer, a Ray daemon.

The Python API (l2cluster.api: submit, run, open_store) is also here, loaded on first use so that importing any
part of l2cluster stays light."""

__version__ = "0.2.0"

_API = ("Experiment", "Records", "StoreReader", "open_store", "run", "submit")


def __getattr__(name: str):
    if name in _API:
        from l2cluster import api

        return getattr(api, name)
    raise AttributeError(f"module 'l2cluster' has no attribute {name!r}")


def __dir__():
    return [*globals(), *_API]
