"""The Locust user of `kdlab loadtest`: POST /predict at an offered rate, every request's raw timing recorded.

Not imported by kdlab: `kdlab loadtest` (scripts/loadtest.py) runs it in a subprocess, since Locust's gevent
patches the interpreter it runs in:

    python -m locust -f scripts/locustfile.py --headless -u USERS -r USERS -t 30s --host http://127.0.0.1:8000

with its settings in the environment (KDLAB_LOADTEST_*: texts file, rate per user, texts per request, most
requests, output file, seed). Locust's own statistics round response times above 100 ms, so a listener writes
each request's start time, milliseconds, HTTP status, error kind and the batch sizes the server reports, one
JSON line per request, when the run ends.

Arrivals are Poisson: each user sends on its own schedule of exponential gaps at the rate per user (the sum over
users is a Poisson stream at the offered rate, what the capacity plan assumes), late sends going at once. Locust's
`constant_throughput` is not used: users started together keep the same period and stay in step, so the
server gets bursts of one request per user at once (measured here: 10 users at 1 req/s each sent 135 of 149
requests within 5 ms of another, and the p50 through the server was 75 ms instead of 14 ms).
"""
import itertools
import json
import os
import random
import time

import gevent
from locust import FastHttpUser, events, task
from locust.exception import StopUser

TEXTS = json.loads(open(os.environ["KDLAB_LOADTEST_TEXTS"], encoding="utf-8").read())
RATE_PER_USER = float(os.environ["KDLAB_LOADTEST_RATE_PER_USER"])
TEXTS_PER_REQUEST = int(os.environ.get("KDLAB_LOADTEST_TEXTS_PER_REQUEST", "1"))
MAX_REQUESTS = int(os.environ["KDLAB_LOADTEST_MAX_REQUESTS"])
OUT = os.environ["KDLAB_LOADTEST_OUT"]
SEED = int(os.environ.get("KDLAB_LOADTEST_SEED", "0"))

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


user_ids = itertools.count()


class Client(FastHttpUser):
    # Each user sends RATE_PER_USER requests/s on average; the driver starts enough users that a slow answer does
    # not lower the offered rate (an open-loop rate as far as Locust's users allow).

    def on_start(self):
        self.rng = random.Random(SEED * 100_003 + next(user_ids))
        first = self.rng.expovariate(RATE_PER_USER)
        self.due = time.monotonic() + first
        gevent.sleep(first)  # users spawned together start apart

    def wait_time(self):
        self.due += self.rng.expovariate(RATE_PER_USER)
        return max(0.0, self.due - time.monotonic())

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
