"""OIP v2 inference over HTTP/JSON (``POST /v2/models/{model}/infer``), against ``--host``."""

from __future__ import annotations

import numpy as np
from locust import HttpUser, task
from requests.exceptions import JSONDecodeError

from loadtests.common import INPUT_NAME, SERVED, check_outputs, paced_wait, sample_batch


class HttpInferUser(HttpUser):
    wait_time = paced_wait

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.model = opts.model
        self.batch = opts.batch
        self.timeout = opts.request_timeout
        self.rng = np.random.default_rng()

    @task
    def infer(self) -> None:
        images = sample_batch(self.rng, self.batch)
        body = {"inputs": [{"name": INPUT_NAME, "shape": list(images.shape), "datatype": "FP32",
                            "data": images.ravel().tolist()}]}
        # One stats row for every model name: the path carries it, the row name does not.
        with self.client.post(f"/v2/models/{self.model}/infer", json=body, timeout=self.timeout,
                              name="/v2/models/[model]/infer", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            try:
                reply = resp.json()
                outputs = {o["name"]: (o["datatype"], o["shape"]) for o in reply["outputs"]}
            except (JSONDecodeError, KeyError, TypeError) as e:
                resp.failure(f"malformed infer response: {e!r}")
                return
            problem = check_outputs(outputs, self.batch)
            if problem:
                resp.failure(problem)
                return
            SERVED.add("http", str(reply.get("model_version", "")))
