#!/usr/bin/env python3
"""Smoke test of a running convoy fleet with a stock gRPC client.

Uses only server reflection: no .proto files and no generated code. Message classes are
built at run time from the descriptors the server serves.

usage: python3 infra/local/smoke.py HOST:PORT [ANALYTICS_HOST:PORT]

Calls carry the bearer token in $CONVOY_TOKEN, or in the file $CONVOY_TOKEN_FILE (up.sh writes
a development admin token to .convoy/auth/admin.token); with one, the smoke also checks that a
call without it is refused with UNAUTHENTICATED.

With an analytics address, it also asks the analytics service for the smoke team's summary,
carrying the conversation calls' consistency token, and expects the smoke's conversation.

Needs grpcio, grpcio-reflection and protobuf (infra/local/requirements.txt). Exits 0 when
every step passes, 1 when one fails, 2 on bad usage or missing packages.
"""

from __future__ import annotations

import collections
import os
import secrets
import sys
import time
import traceback

try:
    import grpc
    from google.protobuf import descriptor_pool, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )
except ImportError as e:  # pragma: no cover - environment problem
    print(
        f"smoke: missing Python package ({e}); run: "
        "python3 -m pip install -r infra/local/requirements.txt",
        file=sys.stderr,
    )
    sys.exit(2)

TOKEN_HEADER = "convoy-consistency-token"
TIMEOUT_S = 5.0
CONVERSATION_SERVICE = "convoy.v1.ConversationService"
ANALYTICS_SERVICE = "convoy.v1.AnalyticsService"
HEALTH_SERVICE = "grpc.health.v1.Health"


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class _DefaultTimeout(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Gives every call without a deadline (the reflection client's among them) one."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout

    def _details(self, d: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        if d.timeout is not None:
            return d
        return _CallDetails(
            d.method,
            self._timeout,
            d.metadata,
            d.credentials,
            getattr(d, "wait_for_ready", None),
            getattr(d, "compression", None),
        )

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class StepFailed(Exception):
    """A check did not hold."""


def check(cond: bool, message: str) -> None:
    if not cond:
        raise StepFailed(message)


def describe_rpc_error(e: grpc.RpcError) -> str:
    code = e.code() if hasattr(e, "code") else None
    details = e.details() if hasattr(e, "details") else str(e)
    name = code.name if code is not None else "?"
    return f"RPC failed: {name}: {details}"


class Client:
    """Dynamic stubs over one channel, from the server's reflection service."""

    def __init__(self, target: str, bearer: str | None = None) -> None:
        raw = grpc.insecure_channel(target)
        try:
            grpc.channel_ready_future(raw).result(timeout=TIMEOUT_S)
        except grpc.FutureTimeoutError:
            raw.close()
            raise StepFailed(f"cannot connect to {target} within {TIMEOUT_S:.0f} s") from None
        self.channel = grpc.intercept_channel(raw, _DefaultTimeout(TIMEOUT_S))
        self._raw = raw
        self.db = ProtoReflectionDescriptorDatabase(self.channel)
        self.pool = descriptor_pool.DescriptorPool(self.db)
        # The newest consistency token a write returned (see `send`).
        self.token: str | None = None
        # The bearer token every call carries, if any.
        self.bearer = bearer

    def close(self) -> None:
        self._raw.close()

    def services(self) -> list[str]:
        return list(self.db.get_services())

    def message(self, full_name: str):
        """The class of message `full_name`."""
        return message_factory.GetMessageClass(self.pool.FindMessageTypeByName(full_name))

    def call(self, service: str, method: str, /, **fields):
        """Calls unary `service/method` with a request built from `fields`."""
        req = self.request(service, method)
        for k, v in fields.items():
            setattr(req, k, v)
        return self.send(service, method, req)

    def _method(self, service: str, method: str):
        m = self.pool.FindServiceByName(service).methods_by_name.get(method)
        check(m is not None, f"{service} has no method {method}")
        return m

    def request(self, service: str, method: str):
        """An empty request message for `service/method`, to fill in before `send`."""
        return message_factory.GetMessageClass(self._method(service, method).input_type)()

    def send(self, service: str, method: str, req, *, anonymous: bool = False):
        """A unary call of `service/method`, with a deadline (and no bearer token when
        `anonymous`)."""
        resp_cls = message_factory.GetMessageClass(self._method(service, method).output_type)
        stub = self.channel.unary_unary(
            f"/{service}/{method}",
            request_serializer=lambda msg: msg.SerializeToString(),
            response_deserializer=resp_cls.FromString,
        )
        # Session consistency: every call carries the newest write's consistency token, so
        # reads see this client's writes even when a replica answers them.
        metadata = [(TOKEN_HEADER, self.token)] if self.token else []
        if self.bearer and not anonymous:
            metadata.append(("authorization", f"Bearer {self.bearer}"))
        resp, call = stub.with_call(req, timeout=TIMEOUT_S, metadata=metadata or None)
        for key, value in call.initial_metadata() or ():
            if key == TOKEN_HEADER:
                self.token = value
        return resp


def bearer_from_env() -> str | None:
    """$CONVOY_TOKEN, or the contents of $CONVOY_TOKEN_FILE, or None."""
    token = os.environ.get("CONVOY_TOKEN")
    path = os.environ.get("CONVOY_TOKEN_FILE")
    if not token and path:
        with open(path, encoding="ascii") as f:
            token = f.read().strip()
    return token or None


def enum_value(message_descriptor, field: str, name: str) -> int:
    """The number of enum value `name` of `field` (a field of `message_descriptor`)."""
    f = message_descriptor.fields_by_name[field]
    check(f.enum_type is not None, f"{message_descriptor.full_name}.{field} is not an enum")
    v = f.enum_type.values_by_name.get(name)
    check(v is not None, f"{f.enum_type.full_name} has no value {name}")
    return v.number


def enum_name(message, field: str) -> str:
    f = message.DESCRIPTOR.fields_by_name[field]
    v = f.enum_type.values_by_number.get(getattr(message, field))
    return v.name if v is not None else str(getattr(message, field))


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3) or argv[1] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    target = argv[1]
    analytics_target = argv[2] if len(argv) == 3 else None
    bearer = bearer_from_env()
    total = 7 + (1 if analytics_target else 0) + (1 if bearer else 0)
    team = f"teams/smoke-{secrets.token_hex(4)}"
    title = "Flaky test in CI"
    state: dict = {}
    passed = failed = 0

    try:
        client = Client(target, bearer)
    except StepFailed as e:
        print(f"FAIL connect: {e}", file=sys.stderr)
        print(f"smoke: 0 passed, {total} failed")
        return 1

    def step(number: int, title_: str, needs: str | None, fn) -> None:
        nonlocal passed, failed
        label = f"[{number}/{total}] {title_}"
        if needs is not None and needs not in state:
            failed += 1
            print(f"FAIL {label}: skipped, an earlier step it needs failed", flush=True)
            return
        try:
            detail = fn()
        except StepFailed as e:
            failed += 1
            print(f"FAIL {label}: {e}", flush=True)
        except grpc.RpcError as e:
            failed += 1
            print(f"FAIL {label}: {describe_rpc_error(e)}", flush=True)
        except Exception as e:  # noqa: BLE001 - report anything, keep going
            failed += 1
            print(f"FAIL {label}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
        else:
            passed += 1
            print(f"ok   {label}" + (f": {detail}" if detail else ""), flush=True)

    def list_services():
        services = client.services()
        for want in (CONVERSATION_SERVICE, HEALTH_SERVICE):
            check(want in services, f"reflection does not list {want} (it lists {services})")
        # Resolving the service proves the descriptors behind it are served too.
        client.pool.FindServiceByName(CONVERSATION_SERVICE)
        state["reflection"] = True
        return ", ".join(sorted(services))

    def health():
        out = []
        for name in (CONVERSATION_SERVICE, ""):
            resp = client.call(HEALTH_SERVICE, "Check", service=name)
            serving = enum_value(resp.DESCRIPTOR, "status", "SERVING")
            check(
                resp.status == serving,
                f"Health/Check({name!r}) is {enum_name(resp, 'status')}, not SERVING",
            )
            out.append(f"{name or '(server)'} SERVING")
        return ", ".join(out)

    def create():
        req = client.request(CONVERSATION_SERVICE, "CreateConversation")
        req.parent = team
        req.conversation.title = title
        req.conversation.intent = enum_value(req.conversation.DESCRIPTOR, "intent", "INTENT_DEBUG")
        conv = client.send(CONVERSATION_SERVICE, "CreateConversation", req)
        check(
            conv.name.startswith(team + "/conversations/"),
            f"name {conv.name!r} is not under {team}/conversations/",
        )
        check(conv.etag != "", "etag is empty")
        check(conv.title == title, f"title is {conv.title!r}, want {title!r}")
        check(
            enum_name(conv, "intent") == "INTENT_DEBUG",
            f"intent is {enum_name(conv, 'intent')}",
        )
        state["name"] = conv.name
        return conv.name

    def get():
        conv = client.call(CONVERSATION_SERVICE, "GetConversation", name=state["name"])
        check(conv.name == state["name"], f"name is {conv.name!r}, want {state['name']!r}")
        check(conv.title == title, f"title is {conv.title!r}, want {title!r}")
        return f"title {conv.title!r}"

    def append():
        req = client.request(CONVERSATION_SERVICE, "AppendEvents")
        req.parent = state["name"]
        ev = req.events.add()
        ev.kind = enum_value(ev.DESCRIPTOR, "kind", "EVENT_KIND_MESSAGE")
        ev.role = enum_value(ev.DESCRIPTOR, "role", "ROLE_USER")
        now = time.time_ns()
        ev.occur_time.seconds = now // 1_000_000_000
        ev.occur_time.nanos = now % 1_000_000_000
        ev.content = "hello"
        resp = client.send(CONVERSATION_SERVICE, "AppendEvents", req)
        conv = resp.conversation
        check(
            conv.message_count == 1,
            f"message_count is {conv.message_count}, want 1 (event_count {conv.event_count})",
        )
        check(len(resp.events) == 1, f"{len(resp.events)} events stored, want 1")
        return f"message_count 1, event {resp.events[0].name}"

    def list_():
        resp = client.call(CONVERSATION_SERVICE, "ListConversations", parent=team)
        names = [c.name for c in resp.conversations]
        check(names == [state["name"]], f"listed {names}, want [{state['name']!r}]")
        return f"{len(names)} conversation"

    def refused_with(code, send):
        """Runs send(), which must fail with `code`; returns the code's name."""
        try:
            send()
        except grpc.RpcError as e:
            check(e.code() == code, f"got {describe_rpc_error(e)}, want {code.name}")
            return code.name
        raise StepFailed(f"the call succeeded; want {code.name}")

    def malformed():
        return refused_with(
            grpc.StatusCode.INVALID_ARGUMENT,
            lambda: client.call(
                CONVERSATION_SERVICE, "GetConversation", name="teams/Not A Name/convs/x"
            ),
        )

    def analytics():
        other = Client(analytics_target, bearer)
        try:
            # The conversation calls' token: the summary must include their writes.
            other.token = client.token
            req = other.request(ANALYTICS_SERVICE, "GetTeamSummary")
            req.filter.parent = team
            now = int(time.time())
            req.filter.start_time.seconds = now - 3600
            req.filter.end_time.seconds = now + 3600
            resp = other.send(ANALYTICS_SERVICE, "GetTeamSummary", req)
        finally:
            other.close()
        agg = resp.aggregates
        check(agg.conversation_count == 1, f"conversation_count is {agg.conversation_count}, want 1")
        check(agg.message_total == 1, f"message_total is {agg.message_total}, want 1")
        check(
            list(resp.coverage.missing_shards) == [],
            f"shards missing: {list(resp.coverage.missing_shards)}",
        )
        return f"1 conversation, 1 message, from {list(resp.coverage.shards)}"

    def anonymous():
        req = client.request(CONVERSATION_SERVICE, "ListConversations")
        req.parent = team
        return refused_with(
            grpc.StatusCode.UNAUTHENTICATED,
            lambda: client.send(CONVERSATION_SERVICE, "ListConversations", req, anonymous=True),
        )

    try:
        step(1, f"reflection lists {CONVERSATION_SERVICE} and {HEALTH_SERVICE}", None, list_services)
        step(2, "Health/Check is SERVING", "reflection", health)
        step(3, f"CreateConversation under {team}", "reflection", create)
        step(4, "GetConversation returns it", "name", get)
        step(5, "AppendEvents with one MESSAGE event", "name", append)
        step(6, f"ListConversations of {team} returns 1", "name", list_)
        step(7, "GetConversation of a malformed name is INVALID_ARGUMENT", "reflection", malformed)
        if analytics_target:
            step(8, f"AnalyticsService/GetTeamSummary of {team} counts it", "name", analytics)
        if bearer:
            step(total, "ListConversations without a token is UNAUTHENTICATED", "reflection", anonymous)
    finally:
        client.close()

    print(f"smoke: {passed} passed, {failed} failed")
    if failed:
        print(f"smoke: FAILED against {target}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
