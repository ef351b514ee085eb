"""One ClientApp task in a forked child of the warm launcher (client/warm_exec.py): Flower's
``run_clientapp`` with the FAB checked by :class:`client.fab_policy.FabPolicy`, never installed."""

from __future__ import annotations

import logging

from client.fab_policy import FabPolicy, FabRefused, load_installed_clientapp, sha256
from client.peer_check import PeerCheck, PeerRefused, runtime_client

log = logging.getLogger("fedskin.site-exec")


def run_task(
    address: str,
    token: str,
    *,
    insecure: bool,
    certificates: bytes | None,
    check: PeerCheck,
    policy: FabPolicy,
    parent_pid: int | None,
) -> None:
    """Flower's ``run_clientapp`` (flwr/supernode/runtime/run_clientapp.py) for one task,
    except that the FAB is checked by ``policy`` and never installed: the installed
    ClientApp runs. Ends with Flower's ``flwr_exit`` (``SystemExit``)."""
    from flwr.app import Context, Message
    from flwr.app.error import Error
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.common.constant import ErrorCode, SubStatus
    from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
    from flwr.proto.node_pb2 import Node  # pylint: disable=E0611
    from flwr.proto.runtime_pb2 import (  # pylint: disable=E0611
        PullAppMessagesRequest,
        PullTaskInputRequest,
    )
    from flwr.supercore.app_utils import start_parent_process_monitor
    from flwr.supercore.exit import ExitCode, flwr_exit, register_signal_handlers
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.inflatable.inflatable_protobuf_utils import (
        make_confirm_message_received_fn_protobuf,
        make_pull_object_fn_protobuf,
    )
    from flwr.supercore.inflatable.inflatable_utils import pull_and_inflate_object_from_tree
    from flwr.supercore.interceptors import (
        RuntimeTokenHttpInterceptor,
        RuntimeVersionHttpInterceptor,
    )
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType, event
    from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

    if parent_pid is not None:
        start_parent_process_monitor(parent_pid)
    event(EventType.FLWR_CLIENTAPP_RUN_ENTER)
    retry_invoker = make_simple_http_retry_invoker()
    client = runtime_client(
        address,
        insecure=insecure,
        certificates=certificates,
        interceptors=[
            RuntimeTracingInterceptor(),
            RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
            RuntimeTokenHttpInterceptor(token),
        ],
        retry_invoker=retry_invoker,
        check=check,
    )
    heartbeat_sender = None
    message = None
    reply_message = None
    context: Context | None = None
    sub_status = SubStatus.FAILED
    details = "ClientApp task failed due to unknown reason"
    exit_code = ExitCode.SUCCESS

    def on_exit() -> None:
        retry_invoker.max_tries = 1
        try:
            push_task_output(client=client, context=context, sub_status=sub_status, details=details)
        except PeerRefused as err:
            log.error("%s; the task's status was not sent", err)
        if heartbeat_sender is not None and heartbeat_sender.is_running:
            heartbeat_sender.stop()
        client.close()

    register_signal_handlers(
        event_type=EventType.FLWR_CLIENTAPP_RUN_LEAVE,
        exit_message="Task stopped.",
        exit_handlers=[on_exit],
    )

    def pull_message() -> Message:
        """As Flower's ``pull_task_input`` does, after the Context/Run/FAB."""
        res = client.PullMessages(PullAppMessagesRequest())
        if not res.messages_list:
            raise RuntimeError("No messages received from Runtime API")
        node = Node(node_id=context.node_id)
        tree = res.message_object_trees[0]
        msg = pull_and_inflate_object_from_tree(
            tree,
            make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
            make_confirm_message_received_fn_protobuf(
                client.ConfirmMessageReceived, node, context.run_id
            ),
            return_type=Message,
        )
        msg.metadata.__dict__["_message_id"] = tree.object_id
        return msg

    try:
        heartbeat_sender = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat_sender.start()
        res = client.PullTaskInput(PullTaskInputRequest())
        TaskIdentity.task_id = res.task_id
        TaskIdentity.run_id = res.run.run_id
        TaskIdentity.node_id = res.context.node_id
        context = context_from_proto(res.context)
        run = run_from_proto(res.run)
        fab = fab_from_proto(res.fab)
        reason = policy.refusal(fab.content)
        if reason is not None:
            log.error(
                "task %d: refused the FAB of run %d (%s %s, sha256 %s): %s; no ClientApp code ran",
                res.task_id,
                run.run_id,
                run.fab_id or "?",
                run.fab_version or "?",
                sha256(fab.content),
                reason,
            )
            try:  # the message, for an error reply to the ServerApp
                message = pull_message()
            except Exception as err:  # noqa: BLE001
                log.debug("task %d: no message to reply to (%s)", res.task_id, err)
            raise FabRefused(f"site-exec refused the FAB: {reason}")
        message = pull_message()
        client_app = load_installed_clientapp(policy.installed.clientapp_ref())
        reply_message = client_app(message=message, context=context)
        sub_status = SubStatus.COMPLETED
        details = ""
    except Exception as ex:  # noqa: BLE001 - as run_clientapp: report, reply with an Error
        e_code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        reason = str(type(ex)) + ":<'" + str(ex) + "'>"
        if isinstance(ex, FabRefused):
            e_code, reason = ErrorCode.INVALID_FAB, str(ex)
        else:
            if isinstance(ex, LoadClientAppError):
                e_code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
                reason = "An exception was raised when attempting to load `ClientApp`"
            log.error("ClientApp raised an exception", exc_info=ex)
        sub_status = SubStatus.FAILED
        details = reason
        if message:
            reply_message = Message(Error(code=e_code, reason=reason), reply_to=message)
        exit_code = ExitCode.TASK_PROC_EXCEPTION
        if isinstance(ex, ImportError):
            exit_code = ExitCode.COMMON_APP_IMPORT_ERROR
    finally:
        if reply_message and context:
            try:
                push_message(client, reply_message, context)
            except Exception as ex:  # noqa: BLE001
                log.error("Failed to push reply message", exc_info=ex)
                exit_code = ExitCode.CLIENTAPP_COMMUNICATION_ERROR
    flwr_exit(code=exit_code, event_type=EventType.FLWR_CLIENTAPP_RUN_LEAVE)
