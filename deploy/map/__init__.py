"""Package data, not code: the MAP build-context templates and docs (installed as ``radnode.deploy_map``).

``radnode map build`` (radnode/map.py) reads them with ``importlib.resources``, in a wheel install as in a checkout.
"""
