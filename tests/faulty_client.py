"""A ClientApp with two misbehaving sites, for the server's robustness tests.

`vienna_dias` sends NaN weights every round; `rosendahl` crashes in round 1; `vidir_modern`
sends one tensor of the wrong shape. Everything else is the real fedskin ClientApp.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from client import client_app as real

app = ClientApp()
NAN_SITE, CRASH_SITE, SHAPE_SITE = "vienna_dias", "rosendahl", "vidir_modern"


@app.query()
def query(msg: Message, context: Context) -> Message:
    return real.query(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = real.train(msg, context)
    site = str(reply.content.config_records["site"]["site"])
    server_round = int(msg.content.config_records["config"]["server-round"])
    if site == CRASH_SITE and server_round == 1:
        raise RuntimeError("simulated crash at the site")
    if site == NAN_SITE:
        arrays = reply.content.array_records["arrays"]
        poisoned = {}
        for k, v in arrays.items():
            a = np.array(v.numpy())
            if np.issubdtype(a.dtype, np.floating):
                a[...] = np.nan
            poisoned[k] = Array(a)
        reply.content.array_records["arrays"] = ArrayRecord(poisoned)
    if site == SHAPE_SITE:  # e.g. a site running another version of the model
        arrays = reply.content.array_records["arrays"]
        wrong = {k: Array(np.array(v.numpy())) for k, v in arrays.items()}
        key = next(k for k, v in wrong.items() if v.numpy().ndim >= 1 and v.numpy().shape[0] > 1)
        wrong[key] = Array(np.array(wrong[key].numpy()[:-1]))
        reply.content.array_records["arrays"] = ArrayRecord(wrong)
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return real.evaluate(msg, context)
