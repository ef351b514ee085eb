"""The real fedskin ClientApp, plus a record of what each site sent and kept (tests only).

After every train message a site writes, under the run's ``state-dir``, the weights it sent
and the personal entries its ``context.state`` holds, so that a test can check in a real
simulation that the state lives across rounds, differs between sites and is never sent.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client import client_app as real
from client.task import PERSONAL, PERSONAL_META

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    return real.query(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    had_state = PERSONAL in context.state.array_records
    reply = real.train(msg, context)
    site = str(reply.content.config_records["site"]["site"])
    server_round = int(msg.content.config_records["config"]["server-round"])
    out = Path(str(context.run_config["state-dir"])) / "record"
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{site}-r{server_round}"
    sent = reply.content.array_records["arrays"]
    np.savez(f"{stem}-sent.npz", **{k: v.numpy() for k, v in sent.items()})
    meta = {
        "had-state": had_state,
        "num-examples": int(reply.content.metric_records["metrics"]["num-examples"]),
    }
    if PERSONAL in context.state.array_records:
        kept = context.state.array_records[PERSONAL]
        np.savez(f"{stem}-kept.npz", **{k: v.numpy() for k, v in kept.items()})
        meta["meta"] = dict(context.state.config_records[PERSONAL_META])
    Path(f"{stem}.json").write_text(json.dumps(meta))
    return reply


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return real.evaluate(msg, context)
