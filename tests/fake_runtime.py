"""An impostor of a SuperNode's Runtime API, and the app bundles (FABs) it serves.

``python -m tests.fake_runtime --port P --fab FILE --record FILE`` answers, on 127.0.0.1:P,
Flower 1.41's Runtime API as a SuperNode does (protobuf bodies over HTTP, the paths of
``flwr.supercore.runtime.RuntimeHttpClient``): ``AcquireTask`` hands out one ClientApp task
(``('evil-token', 42)``), ``PullTaskInput`` serves that task's Run, Context and the FAB
from FILE, ``PullMessages``/``PullObject`` a real Flower ``query`` message; every request
(path, and what a ``PushTaskOutput``/``PushMessages`` said) is appended to the record as
JSON lines. Nothing here is mocked on the client side: whoever connects talks to a real
HTTP server in its own process.

:func:`build_fab` makes FABs with Flower's own ``flwr build`` code; :func:`malicious_fab`
is the fedskin app whose ``client/client_app.py`` writes a marker file when imported.
"""

from __future__ import annotations

import argparse
import json
import shutil
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

TOKEN = "evil-token"
TASK_ID = 42
RUN_ID = 7
NODE_ID = 1234


def build_fab(app_dir: Path) -> bytes:
    """The FAB ``flwr build``/``flwr run`` makes of ``app_dir`` (Flower's own code)."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(app_dir)


def malicious_fab(app_dir: Path, marker: Path) -> bytes:
    """The fedskin app in ``app_dir`` (a copy of the installed project), its ClientApp
    module changed to write ``marker`` as soon as it is imported."""
    module = app_dir / "client" / "client_app.py"
    payload = f"\nimport pathlib\n\npathlib.Path({str(marker)!r}).write_text('pwned')\n"
    module.write_text(module.read_text() + payload)
    return build_fab(app_dir)


def copy_app(src: Path, dest: Path) -> Path:
    """The project's packages and pyproject.toml, as ``flwr run`` ships them."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "runs", ".*")
    for pkg in ("server", "client", "common", "simulations"):
        shutil.copytree(src / pkg, dest / pkg, ignore=ignore)
    shutil.copy(src / "pyproject.toml", dest / "pyproject.toml")
    return dest


class _State:
    fab: bytes = b""
    record: Path = Path("/dev/null")
    handed_out = False
    message = None  # the query message (flwr.app.Message)
    objects: dict = {}


def _message():
    from flwr.app import Message, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.task_identity import TaskIdentity

    from tests.helpers import assign_message_id

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, 0  # ServerApp
    msg = Message(RecordDict(), dst_node_id=NODE_ID, message_type="query")
    assign_message_id(msg, msg.object_id)
    return msg, get_all_nested_objects(msg)


def _answer(path: str, body: bytes) -> tuple[bytes, dict]:
    """The protobuf reply to ``path`` and what to record of the request."""
    from flwr.app import Context, RecordDict
    from flwr.app.message import remove_content_from_message
    from flwr.common.serde import context_to_proto, fab_to_proto, message_to_proto, run_to_proto
    from flwr.proto import message_pb2, runtime_pb2, task_pb2
    from flwr.supercore.constant import TaskType
    from flwr.supercore.fab import Fab
    from flwr.supercore.inflatable.inflatable_object import get_object_tree
    from flwr.supercore.run import Run

    note: dict = {}
    name = path.rsplit("/", 1)[-1]
    if name == "acquire-task":
        if _State.handed_out:
            return runtime_pb2.AcquireTaskResponse().SerializeToString(), note
        _State.handed_out = True
        task = task_pb2.Task(task_id=TASK_ID, type=TaskType.CLIENT_APP.value, run_id=RUN_ID)
        res = runtime_pb2.AcquireTaskResponse(task=task, token=TOKEN)
        return res.SerializeToString(), note
    if name == "pull-task-input":
        import hashlib

        fab_hash = hashlib.sha256(_State.fab).hexdigest()
        run = Run.create_empty(RUN_ID)
        run.fab_id, run.fab_version, run.fab_hash = "fedskin/fedskin", "0.1.0", fab_hash
        run.primary_task_type = TaskType.CLIENT_APP
        context = Context(
            run_id=RUN_ID, node_id=NODE_ID, node_config={}, state=RecordDict(), run_config={}
        )
        res = runtime_pb2.PullTaskInputResponse(
            context=context_to_proto(context),
            run=run_to_proto(run),
            fab=fab_to_proto(Fab(fab_hash, _State.fab, {})),
            task_id=TASK_ID,
        )
        return res.SerializeToString(), note
    if name == "pull-messages":
        if _State.message is None:
            _State.message, _State.objects = _message()
        msg = _State.message
        res = runtime_pb2.PullAppMessagesResponse(
            messages_list=[message_to_proto(remove_content_from_message(msg))],
            message_object_trees=[get_object_tree(msg)],
        )
        return res.SerializeToString(), note
    if name == "pull-object":
        req = message_pb2.PullObjectRequest.FromString(body)
        obj = _State.objects.get(req.object_id)
        res = message_pb2.PullObjectResponse(
            object_found=obj is not None,
            object_available=obj is not None,
            object_content=obj.deflate() if obj is not None else b"",
        )
        return res.SerializeToString(), note
    if name == "push-task-output":
        req = runtime_pb2.PushTaskOutputRequest.FromString(body)
        note = {"sub_status": req.sub_status, "details": req.details}
        return runtime_pb2.PushTaskOutputResponse().SerializeToString(), note
    if name == "push-messages":
        req = runtime_pb2.PushAppMessagesRequest.FromString(body)
        note = {
            "errors": [
                {"code": m.error.code, "reason": m.error.reason}
                for m in req.messages_list
                if m.HasField("error")
            ]
        }
        return runtime_pb2.PushAppMessagesResponse().SerializeToString(), note
    if name == "send-task-heartbeat":
        return runtime_pb2.SendTaskHeartbeatResponse(success=True).SerializeToString(), note
    return b"", note  # an empty protobuf: every field at its default


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        try:
            reply, note = _answer(self.path, body)
            status = 200
        except Exception as err:  # noqa: BLE001 - a test server: say what broke
            reply, note, status = str(err).encode(), {"error": repr(err)}, 500
        with _State.record.open("a") as fh:
            fh.write(json.dumps({"path": self.path, **note}) + "\n")
        self.send_response(status)
        self.send_header("content-type", "application/protobuf")
        self.send_header("content-length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def serve(port: int, fab: Path, record: Path) -> None:
    _State.fab = fab.read_bytes()
    _State.record = record
    server = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
    print(f"fake Runtime API on 127.0.0.1:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--fab", type=Path, required=True)
    parser.add_argument("--record", type=Path, required=True)
    args = parser.parse_args()
    serve(args.port, args.fab, args.record)
