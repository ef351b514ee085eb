"""The real fedskin ClientApp, plus a note of the Ray node each message ran on (tests only).

Every message a site handles is passed unchanged to ``client.client_app.app`` (its mods
included); before that, the Ray actor process appends one line, ``<node id> <site partition>
<message type>``, to ``<out-dir>/ray-nodes/<pid>.txt`` (one file per actor process, so no
two processes write the same file). ``tests/test_ray_cluster.py`` reads them to check that
site work ran on every node of a real two-node cluster.
"""

from __future__ import annotations

import os
from pathlib import Path

import ray
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client import client_app as real

app = ClientApp()
NODES_DIR = "ray-nodes"


def _note(msg: Message, context: Context) -> None:
    out = Path(str(context.run_config["out-dir"])) / NODES_DIR
    out.mkdir(parents=True, exist_ok=True)
    node = ray.get_runtime_context().get_node_id()
    site = context.node_config.get("partition-id", "?")
    with open(out / f"{os.getpid()}.txt", "a") as f:
        f.write(f"{node} {site} {msg.metadata.message_type}\n")


@app.query()
def query(msg: Message, context: Context) -> Message:
    _note(msg, context)
    return real.app(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    _note(msg, context)
    return real.app(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    _note(msg, context)
    return real.app(msg, context)
