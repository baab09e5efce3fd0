"""The Locust user of `kdlab loadtest`: POST /predict at a constant rate, every request's raw timing recorded.

Not imported by kdlab: `kdlab loadtest` (scripts/loadtest.py) runs it in a subprocess, since Locust's gevent
patches the interpreter it runs in:

    python -m locust -f scripts/locustfile.py --headless -u USERS -r USERS -t 30s --host http://127.0.0.1:8000

with its settings in the environment (KDLAB_LOADTEST_*: texts file, rate per user, texts per request, most
requests, output file). Locust's own statistics round response times above 100 ms, so a listener writes each
request's start time, milliseconds, HTTP status, error kind and the batch sizes the server reports, one JSON
line per request, when the run ends.
"""
import itertools
import json
import os

from locust import FastHttpUser, constant_throughput, events, task
from locust.exception import StopUser

TEXTS = json.loads(open(os.environ["KDLAB_LOADTEST_TEXTS"], encoding="utf-8").read())
RATE_PER_USER = float(os.environ["KDLAB_LOADTEST_RATE_PER_USER"])
TEXTS_PER_REQUEST = int(os.environ.get("KDLAB_LOADTEST_TEXTS_PER_REQUEST", "1"))
MAX_REQUESTS = int(os.environ["KDLAB_LOADTEST_MAX_REQUESTS"])
OUT = os.environ["KDLAB_LOADTEST_OUT"]

sent = itertools.count()
records: list[dict] = []


@events.request.add_listener
def record(request_type, name, response_time, response_length, response=None, context=None, exception=None,
           start_time=None, **_):
    status = getattr(response, "status_code", 0) or 0
    batch_sizes = None
    if status == 200:
        try:
            batch_sizes = json.loads(response.text).get("batch_sizes")
        except (ValueError, AttributeError):
            pass
    kind = None
    if exception is not None:
        kind = f"HTTP {status}" if status else type(exception).__name__
    records.append({"start_s": start_time, "ms": response_time, "status": status, "error": kind,
                    "batch_sizes": batch_sizes})


@events.quitting.add_listener
def write_records(environment, **_):
    with open(OUT, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")


class Client(FastHttpUser):
    # Each user sends at most RATE_PER_USER requests/s; the driver starts enough users that a slow answer does
    # not lower the offered rate (an open-loop rate as far as Locust's users allow).
    wait_time = constant_throughput(RATE_PER_USER)

    @task
    def predict(self):
        n = next(sent)
        if n >= MAX_REQUESTS:  # the bound on the count; -t bounds the time
            if n == MAX_REQUESTS:
                self.environment.runner.quit()
            raise StopUser()
        texts = [TEXTS[(n * TEXTS_PER_REQUEST + i) % len(TEXTS)] for i in range(TEXTS_PER_REQUEST)]
        with self.client.post("/predict", json={"texts": texts}, name="/predict", catch_response=True) as r:
            if r.status_code == 200:
                r.success()
            else:
                r.failure(f"HTTP {r.status_code}")
