"""radnode's Orthanc plugin (orthanc-python): tells the node about stored instances and stable studies.

It stays thin and never blocks Orthanc: the callbacks only put a small event on a queue; one worker
thread POSTs each event as JSON to the node (``RadNode.NodeUrl`` + ``/orthanc/events``), which answers at
once and pulls the data through Orthanc's REST API itself. If the node is unreachable, an event is
retried a few times, then dropped: the study's ``stable-study`` event makes the node pull whatever it
missed. Standard library and the ``orthanc`` module only (it runs in Orthanc's Python, not the node's).

Configuration (in Orthanc's JSON)::

    "RadNode": {"NodeUrl": "http://127.0.0.1:8765", "TokenFile": "/path/to/orthanc-event-token",
                "EarlyTrigger": true}

``TokenFile``: the file holding the token the node expects (``orthanc.event_token_file`` on the node's side;
``radnode orthanc-config`` writes both), sent as ``Authorization: Bearer``; the node refuses events without
it. ``CaFile``: the CA bundle to check an ``https://`` node against. ``EarlyTrigger`` false sends only
stable-study events (the node then pulls whole studies).
"""

import json
import queue
import ssl
import threading
import time
import urllib.error
import urllib.request

import orthanc

_settings = json.loads(orthanc.GetConfiguration()).get("RadNode", {})
NODE_URL = str(_settings.get("NodeUrl", "http://127.0.0.1:8765")).rstrip("/")
EARLY_TRIGGER = bool(_settings.get("EarlyTrigger", True))


def _read_token(path):
    """The node's event token from its file ('' when unset or unreadable: the node will refuse the events)."""
    if not path:
        return ""
    try:
        with open(path) as handle:
            return handle.read().strip()
    except OSError as e:
        orthanc.LogError("radnode: cannot read TokenFile %s: %s" % (path, e))
        return ""


TOKEN = _read_token(_settings.get("TokenFile"))
SSL_CONTEXT = ssl.create_default_context(cafile=_settings.get("CaFile")) if NODE_URL.startswith("https") else None
TIMEOUT_SECONDS = 5.0
RETRY_SECONDS = (0.2, 1.0, 3.0)

_events = queue.Queue()


def _post(event):
    """POST one event to the node; True when it was accepted."""
    headers = {"Content-Type": "application/json"}
    if TOKEN:
        headers["Authorization"] = "Bearer " + TOKEN
    request = urllib.request.Request(NODE_URL + "/orthanc/events", data=json.dumps(event).encode(),
                                     headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS, context=SSL_CONTEXT) as response:
            return 200 <= response.status < 300
    except urllib.error.HTTPError as e:
        if e.code == 401:  # a wrong token never gets better by retrying
            orthanc.LogError("radnode: the node refused the plugin's token (TokenFile / orthanc.event_token_file)")
            return True
        orthanc.LogWarning("radnode: event %s %s refused by %s: HTTP %d" % (event["type"], event["id"], NODE_URL, e.code))
        return False
    except (urllib.error.URLError, OSError, ValueError) as e:
        orthanc.LogWarning("radnode: event %s %s not delivered to %s: %s" % (event["type"], event["id"], NODE_URL, e))
        return False


def _deliver_forever():
    """The worker thread: send queued events in order; None ends it."""
    while True:
        event = _events.get()
        if event is None:
            return
        for wait in RETRY_SECONDS + (None,):
            if _post(event):
                break
            if wait is None:
                orthanc.LogError("radnode: event %s %s dropped" % (event["type"], event["id"]))
            else:
                time.sleep(wait)


def on_stored_instance(dicom, instance_id):
    """An instance was stored: queue an early-trigger event (never any work here)."""
    _events.put({"type": "stored", "id": instance_id, "remote_aet": dicom.GetInstanceRemoteAet() or ""})


def on_change(change_type, level, resource_id):
    """Queue stable-study events; end the worker when Orthanc stops."""
    if change_type == orthanc.ChangeType.STABLE_STUDY:
        _events.put({"type": "stable-study", "id": resource_id})
    elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
        _events.put(None)


_worker = threading.Thread(target=_deliver_forever, name="radnode-events", daemon=True)
_worker.start()
if EARLY_TRIGGER:
    orthanc.RegisterOnStoredInstanceCallback(on_stored_instance)
orthanc.RegisterOnChangeCallback(on_change)
orthanc.LogWarning("radnode plugin: events go to %s (early trigger %s, token %s)"
                   % (NODE_URL, EARLY_TRIGGER, "set" if TOKEN else "MISSING: the node will refuse the events"))
