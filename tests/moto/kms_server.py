"""moto's server (from PyPI) for keyd's AWS KMS tests, with two test-only additions.

moto models KMS in memory and does not model key state. keyd's tests need two things a real
KMS does, so this launcher adds them around moto's own server (`moto.server.main`, the code
behind the `moto_server` command):

1. Keys survive a restart. The harness stops this server mid-run to simulate a KMS outage and
   starts it again; a real KMS does not lose its keys in an outage, so key ids, ARNs, key
   material and key state are written to --state on every change and restored at start.
2. Key state is enforced. Disabled keys and keys pending deletion refuse cryptographic
   operations with KMS's documented DisabledException and KMSInvalidStateException.

Everything else (the KMS JSON API, encryption context checks, IAM authorization when
/moto-api/reset-auth enables it) is moto's own behaviour.

Usage: kms_server.py --port PORT --state FILE [--parent-pid PID]
"""

import argparse
import base64
import json
import os
import threading
import time

from moto import server
from moto.core.exceptions import JsonRESTError
from moto.kms import models

LOCK = threading.Lock()
STATE_FILE = None


def save():
    keys = []
    for account_id, regions in list(models.kms_backends.items()):
        for region, backend in list(regions.items()):
            for key in list(backend.keys.values()):
                keys.append({
                    "account": account_id,
                    "region": region,
                    "id": key.id,
                    "arn": key.arn,
                    "material": base64.b64encode(key.key_material).decode(),
                    "state": key.key_state,
                    "description": key.description,
                })
    tmp = STATE_FILE + ".tmp"
    with open(tmp, "w") as f:
        json.dump(keys, f)
    os.replace(tmp, STATE_FILE)


def restore():
    if not os.path.exists(STATE_FILE):
        return
    with open(STATE_FILE) as f:
        keys = json.load(f)
    for k in keys:
        backend = models.kms_backends[k["account"]][k["region"]]
        key = ORIGINAL["create_key"](backend, None, "ENCRYPT_DECRYPT", "SYMMETRIC_DEFAULT",
                                     k["description"], None)
        del backend.keys[key.id]
        key.id = k["id"]
        key.arn = k["arn"]
        key.key_material = base64.b64decode(k["material"])
        key.key_state = k["state"]
        key.enabled = k["state"] == "Enabled"
        backend.keys[key.id] = key


def check_state(backend, key_id):
    key = backend.keys.get(backend.any_id_to_key_id(key_id))
    if key is None:
        return
    if key.key_state == "Disabled":
        raise JsonRESTError("DisabledException", f"{key.arn} is disabled.")
    if key.key_state == "PendingDeletion":
        raise JsonRESTError("KMSInvalidStateException", f"{key.arn} is pending deletion.")


ORIGINAL = {}


def persisting(name):
    original = getattr(models.KmsBackend, name)
    ORIGINAL[name] = original

    def wrapper(self, *args, **kwargs):
        with LOCK:
            result = original(self, *args, **kwargs)
            save()
            return result

    setattr(models.KmsBackend, name, wrapper)


def state_checked(name, key_arg):
    original = getattr(models.KmsBackend, name)
    ORIGINAL[name] = original

    def wrapper(self, *args, **kwargs):
        key_id = kwargs.get(key_arg)
        if key_id is not None:
            check_state(self, key_id)
        result = original(self, *args, **kwargs)
        if name == "decrypt":
            # The key is named by the ciphertext: check the one that decrypted it.
            check_state(self, result[1])
        if name == "re_encrypt":
            check_state(self, result[1])
        return result

    setattr(models.KmsBackend, name, wrapper)


def watch_parent(pid):
    while True:
        if os.getppid() != pid:
            os._exit(0)
        time.sleep(0.5)


def main():
    global STATE_FILE
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--state", required=True)
    p.add_argument("--parent-pid", type=int)
    args = p.parse_args()
    STATE_FILE = args.state
    for name in ("create_key", "enable_key", "disable_key", "schedule_key_deletion",
                 "cancel_key_deletion"):
        persisting(name)
    state_checked("encrypt", "key_id")
    state_checked("generate_data_key", "key_id")
    state_checked("decrypt", "key_id")
    state_checked("re_encrypt", "destination_key_id")
    restore()
    if args.parent_pid:
        threading.Thread(target=watch_parent, args=(args.parent_pid,), daemon=True).start()
    server.main(["-H", "127.0.0.1", "-p", str(args.port)])


if __name__ == "__main__":
    main()
