"""An in-process Grid: the ServerApp's round loop talks to ClientApp callables directly.

No SuperLink, no Ray, no serialisation: for unit tests of the federation (strategies end to
end, failure injection, resume), debugging and the framework-overhead benchmark. Each node keeps
its own :class:`flwr.app.Context` (``node_config`` with ``partition-id``, a persistent ``state``)
across rounds, as a Flower SuperNode does.

Slow and dead sites: ``delay={node: seconds}`` holds a node's reply back that long after its
message is delivered; a client that returns ``None`` never replies. A reply is kept only if it
answers the message delivered (``reply_to_message_id``) and is handed out only to a pull of
that message's id, as Flower's SuperLink does: a stale reply (one built for an earlier message)
is dropped and recorded in ``dropped``.
"""

from __future__ import annotations

import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

ClientFn = Callable[[Message, Context], Message | None]

RUN_ID = 1
SERVER_NODE_ID = 1


def set_task_identity(run_id: int = RUN_ID, node_id: int = SERVER_NODE_ID) -> None:
    """Let ``Message(...)`` be built outside a running app (Flower reads these on creation)."""
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = node_id
    TaskIdentity.task_id = 0


class InProcessGrid(Grid):
    """Deliver messages to ``clients[node_id](message, context)`` synchronously.

    Parameters
    ----------
    clients : mapping node id -> callable
        Usually the ClientApp itself (``client.app.app``); tests wrap it to inject failures.
        A callable that raises produces an error reply (as Flower does); one that returns
        ``None`` never replies (a dead node: the server waits out its grace period).
    run_config : mapping
        The flat run config every node's Context gets.
    node_configs : mapping node id -> dict, optional
        Default: ``{"partition-id": i, "num-partitions": n}`` in node-id order.
    delay : mapping node id -> seconds, optional
        A node's replies become visible to ``pull_messages`` that long after its message was
        delivered (a slow site); the client itself still runs at push time.
    """

    def __init__(
        self,
        clients: Mapping[int, ClientFn],
        run_config: Mapping[str, Any],
        node_configs: Mapping[int, dict[str, Any]] | None = None,
        delay: Mapping[int, float] | None = None,
    ) -> None:
        set_task_identity()
        self.clients = dict(clients)
        self.delay = dict(delay or {})
        ids = sorted(self.clients)
        self.contexts = {
            nid: Context(
                run_id=RUN_ID,
                node_id=nid,
                node_config=dict(
                    (node_configs or {}).get(nid, {"partition-id": i, "num-partitions": len(ids)})
                ),
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i, nid in enumerate(ids)
        }
        self.client_seconds: list[float] = []  # wall time of every delivered message
        self.dropped: list[Message] = []  # replies that answered another message (stale)
        self._replies: dict[str, tuple[float, Message]] = {}  # message id -> (visible at, reply)
        self._run: Any = None

    # --- Grid API -------------------------------------------------------------------------
    def set_run(self, run: Any) -> None:
        self._run = run

    @property
    def run(self) -> Any:
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.clients)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = uuid.uuid4().hex  # the grid sets it on push (as Flower's do); replies key on it
            msg.metadata.__dict__["_message_id"] = mid
            reply = self._deliver(msg)
            if reply is None:
                pass  # a dead node: never replies
            elif reply.metadata.reply_to_message_id != mid:
                self.dropped.append(reply)  # stale: not an answer to this message
            else:
                visible = time.monotonic() + self.delay.get(msg.metadata.dst_node_id, 0.0)
                self._replies[mid] = (visible, reply)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        now = time.monotonic()
        ready = [i for i in message_ids if i in self._replies and self._replies[i][0] <= now]
        return [self._replies.pop(i)[1] for i in ready]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then pull until every reply that will come is in (or ``timeout`` s)."""
        end = None if timeout is None else time.monotonic() + timeout
        pending = [i for i in self.push_messages(messages) if i in self._replies]
        out: list[Message] = []
        while pending:
            out.extend(self.pull_messages(pending))
            pending = [i for i in pending if i in self._replies]
            if not pending:
                break
            wait = min(self._replies[i][0] for i in pending) - time.monotonic()
            if end is not None:
                if time.monotonic() >= end:
                    break
                wait = min(wait, end - time.monotonic())
            time.sleep(max(0.0, wait))
        return out

    # --- delivery -------------------------------------------------------------------------
    def _deliver(self, msg: Message) -> Message | None:
        nid = msg.metadata.dst_node_id
        t0 = time.perf_counter()
        try:
            reply = self.clients[nid](msg, self.contexts[nid])
        except Exception as exc:  # what Flower does with a raising ClientApp
            reason = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
            reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)
        finally:
            self.client_seconds.append(time.perf_counter() - t0)
        return reply
