"""An S3-compatible server for the compose topology: moto's server application with the store's bucket made
at start. For trying the cluster topology on one machine only: moto keeps every object in memory, so
stopping this container loses the store. A real deployment points REFIT_STORE at S3, MinIO, Ceph, ...
"""
import os
import threading
import time

import boto3
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import run_simple

PORT = int(os.environ.get("S3_PORT", "5000"))
BUCKETS = [b for b in os.environ.get("S3_BUCKETS", "refit").split(",") if b]


def make_buckets() -> None:
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{PORT}", region_name="us-east-1",
                          aws_access_key_id="local", aws_secret_access_key="local")
    deadline = time.monotonic() + 60
    while True:
        try:
            for bucket in BUCKETS:
                client.create_bucket(Bucket=bucket)
            print(f"buckets ready: {', '.join(BUCKETS)}", flush=True)
            return
        except Exception as e:  # noqa: BLE001 - the server is not listening yet
            if time.monotonic() > deadline:
                print(f"could not create the buckets: {e}", flush=True)
                os._exit(1)
            time.sleep(0.2)


threading.Thread(target=make_buckets, daemon=True).start()
# One request at a time: moto's conditional PUT checks the ETag and then writes without a lock, so on its
# threaded server two racing compare-and-swaps of the promoted pointer could both pass. S3 applies them
# atomically; serving one request at a time makes moto do the same.
run_simple("0.0.0.0", PORT, DomainDispatcherApplication(create_backend_app), threaded=False,
           request_handler=MotoRequestHandler)
