"""Package data, not code: the OHIF ``app-config.js`` template (installed as ``radnode.deploy_ohif``).

radnode/viewer.py renders it, found with ``importlib.resources``; ``install.sh`` here fetches the viewer itself.
"""
