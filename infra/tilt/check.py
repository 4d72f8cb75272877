#!/usr/bin/env python3
"""Checks the Tiltfile offline: evaluates it with a Starlark interpreter (starlark-pyo3,
which wraps starlark-rust) in both modes, with Tilt's builtins stubbed, and asserts that
what it names exists and that it covers the whole fleet.

Run it through infra/tilt/check.sh, which installs its Python packages. What it does not
do: build images, talk to a cluster, or start a process of the fleet. The stubs keep Tilt's
signatures (an unknown keyword fails as it would in Tilt), and a builtin without a stub is
an error. Two stubs act for real: kustomize() renders with `kustomize build` or `kubectl
kustomize`, as Tilt does, and local() runs its command, with CONVOY_STATE_DIR pointed at a
scratch folder so nothing is written into the checkout.

Assertions, k8s mode (the default, also checked to equal --mode=k8s):
  - the Dockerfile, build contexts, only= entries and kustomize folders exist; each
    docker_build target is a stage of its Dockerfile; only= keeps every workspace member
    and every COPY source of the Dockerfile;
  - every image built is used by a container of the applied YAML, and every convoy/*
    image there is built;
  - every k8s_resource names exactly one workload of the YAML, and every workload has a
    k8s_resource with labels (infrastructure, services or observability);
  - every port forward reaches a port its workload's containers declare, and each
    service's gRPC port, Grafana (3000), Jaeger (16686) and Prometheus (9090) are forwarded;
  - every Secret and ConfigMap the workloads read (with the keys they name) is applied;
Local mode (--mode=local):
  - no image, no YAML; every component of the fleet is a local_resource with a serve_cmd
    and a readiness probe; the scripts they run exist and accept the component (the probe
    runs, and exits 0 or 1: not 2, a usage error); a service's deps are binaries its
    `build` resource builds;
Both modes:
  - every resource_deps entry names a resource, with no cycle, and each component waits
    (directly or not) for what it needs (REQUIRED below); nothing waits for a manual
    trigger (tilt ci would not start it); every path named in a string exists;
  - an unknown --mode fails.

Usage: check.py [--root DIR] [--tiltfile FILE]
  --root      the folder the Tiltfile's paths are relative to (default: the repository)
  --tiltfile  the Tiltfile to evaluate (default: ROOT/Tiltfile), to try a changed copy
"""

import argparse
import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib

import starlark as sl
import yaml

SERVICES = ["conversation", "cache", "shard-router", "analytics"]
SHARDS = [0, 1]
# Each service's gRPC port as k8s mode forwards it to this machine (up.sh's ports, below the
# ephemeral range; the containers listen on 50051, 50061, ...).
LOCAL_GRPC_PORTS = {"conversation": 20051, "cache": 20061, "shard-router": 20071, "analytics": 20081}
# Observability UIs forwarded in k8s mode: workload -> port.
UI_PORTS = {"grafana": 3000, "jaeger": 16686, "prometheus": 9090}
K8S_LABELS = {"infrastructure", "services", "observability"}
LOCAL_LABELS = {"infrastructure", "services", "build"}
WORKLOAD_KINDS = {"deployment", "statefulset", "daemonset", "replicaset", "job", "cronjob", "pod",
                  "replicationcontroller"}


def pg_names(mode):
    """Shard n's primary and replica resource names, per mode."""
    if mode == "local":
        return (lambda n: f"pg-shard-{n}"), (lambda n: f"pg-shard-{n}-replica")
    return (lambda n: f"pg-primary-shard-{n}"), (lambda n: f"pg-replica-shard-{n}")


def required(mode):
    """What each component must wait for, directly or through another resource."""
    primary, replica = pg_names(mode)
    pg = [primary(n) for n in SHARDS] + [replica(n) for n in SHARDS]
    req = {
        "shard-router": ["etcd"] + pg,
        "cache": ["etcd", "redis"],
        "conversation": ["etcd", "redis", "shard-router", "cache"] + [primary(n) for n in SHARDS],
        "analytics": ["etcd", "shard-router", "cache"] + pg,
    }
    for n in SHARDS:
        req[replica(n)] = [primary(n)]
    if mode == "local":
        for s in SERVICES:
            req[s] = req[s] + ["build"]
    return req


def fleet(mode):
    """The components every mode must run."""
    primary, replica = pg_names(mode)
    return ["etcd", "redis"] + [f(n) for n in SHARDS for f in (primary, replica)] + SERVICES


# === stubs ===


class Opaque:
    """A Tilt value the Tiltfile passes around but never looks into (Blob, probe, ...)."""

    def __init__(self, kind, **fields):
        self.kind = kind
        self.__dict__.update(fields)

    def __repr__(self):
        return f"<{self.kind}>"


class TiltfileError(Exception):
    """A call Tilt would refuse."""


def opaque(kind, **fields):
    return sl.OpaquePythonObject(Opaque(kind, **fields))


def expect(value, kind, what):
    if not (isinstance(value, Opaque) and value.kind == kind):
        raise TiltfileError(f"{what}: want a {kind}, got {value!r}")
    return value


def str_list(value, what):
    """Tilt's 'string or list of strings'."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise TiltfileError(f"{what}: want a string or a list of strings, got {value!r}")


class Stubs:
    """Tilt's builtins, recording what the Tiltfile asks for."""

    def __init__(self, root, args, scratch):
        self.root = root
        self.args = args
        self.scratch = scratch
        self.defined = {}
        self.docker_builds = []
        self.objects = []  # (source, object) applied by k8s_yaml
        self.kustomized = []
        self.k8s_resources = []
        self.local_resources = []
        self.paths = []  # (what, path relative to root or absolute, kind: file|dir|any|exe)
        self.strings = []  # every string argument, scanned for paths afterwards
        self.contexts = []

    def path(self, what, p, kind="any"):
        self.paths.append((what, p, kind))
        return p

    def abs(self, p):
        return p if os.path.isabs(p) else os.path.join(self.root, p)

    def note(self, *values):
        for v in values:
            if isinstance(v, str):
                self.strings.append(v)
            elif isinstance(v, (list, tuple)):
                self.note(*v)
            elif isinstance(v, dict):
                self.note(*v.keys(), *v.values())

    # --- config ---
    def define(self, kind):
        def define(name, args=False, usage=""):
            if name in self.defined:
                raise TiltfileError(f"config.define_{kind}: {name} defined twice")
            self.defined[name] = kind
        return define

    def config_parse(self):
        out, rest = {}, list(self.args)
        while rest:
            arg = rest.pop(0)
            if not arg.startswith("--"):
                raise TiltfileError(f"config.parse: positional argument {arg!r} (none is defined with args=True)")
            name, eq, value = arg[2:].partition("=")
            kind = self.defined.get(name)
            if kind is None:
                raise TiltfileError(f"config.parse: unknown flag --{name} (defined: {sorted(self.defined)})")
            if kind == "bool" and not eq:
                value = True
            elif not eq:
                if not rest:
                    raise TiltfileError(f"config.parse: --{name} needs a value")
                value = rest.pop(0)
            if kind == "string_list":
                out.setdefault(name, []).append(value)
            else:
                out[name] = value
        return out

    # --- os ---
    @staticmethod
    def os_getenv(key, default=None):
        # The environment of this check is not the user's: every default applies.
        return default

    def os_path_exists(self, p):
        return os.path.exists(self.abs(p))

    # --- images and YAML ---
    def docker_build(self, ref, context, build_args=None, dockerfile="Dockerfile", dockerfile_contents="",
                     live_update=(), match_in_env_vars=False, ignore=(), only=(), entrypoint=(), target="",
                     ssh="", network="", secret="", extra_tag="", container_args=None, cache_from=(),
                     pull=False, platform="", extra_hosts=()):
        self.note(ref, context, dockerfile, only, target)
        only = str_list(only, "docker_build only")
        self.path(f"docker_build({ref!r}) context", context, "dir")
        if not dockerfile_contents:
            self.path(f"docker_build({ref!r}) dockerfile", dockerfile, "file")
        for o in only:
            self.path(f"docker_build({ref!r}) only", os.path.join(context, o))
        self.docker_builds.append(dict(ref=ref, context=context, dockerfile=dockerfile, only=only, target=target))

    def kustomize(self, paths, kustomize_bin=None, flags=()):
        self.note(paths, flags)
        self.path("kustomize", paths, "dir")
        flags = str_list(flags, "kustomize flags")
        if kustomize_bin:
            argv = [kustomize_bin, "build"]
        elif shutil.which("kustomize"):
            argv = ["kustomize", "build"]
        elif shutil.which("kubectl"):
            argv = ["kubectl", "kustomize"]  # Tilt's fallback too
        else:
            raise TiltfileError(KUBECTL_MISSING)
        self.kustomized.append(paths)
        run = subprocess.run(argv + flags + [paths], check=False, cwd=self.root, capture_output=True, text=True)
        if run.returncode != 0:
            raise TiltfileError(f"{' '.join(argv + flags + [paths])} failed:\n{run.stderr.strip()}")
        return opaque("blob", text=run.stdout, source=f"kustomize({paths!r})")

    def local(self, command, quiet=False, command_bat="", echo_off=False, env=None, dir="", stdin=None):
        self.note(command, dir)
        argv = list(command) if isinstance(command, (list, tuple)) else ["sh", "-c", command]
        run_env = {**os.environ, **(env or {}), "CONVOY_STATE_DIR": self.scratch}
        run = subprocess.run(argv, check=False, cwd=self.abs(dir or "."), env=run_env, capture_output=True, text=True,
                             input=stdin)
        if run.returncode != 0:
            raise TiltfileError(f"local({command!r}) exited {run.returncode}:\n{run.stderr.strip()}")
        return opaque("blob", text=run.stdout, source="local(...)")

    def read_file(self, file_path, default=None):
        self.note(file_path)
        if default is None:
            self.path("read_file", file_path, "file")
        try:
            with open(self.abs(file_path)) as f:
                return opaque("blob", text=f.read(), source=file_path)
        except OSError:
            return default

    def watch_file(self, file_path):
        self.note(file_path)
        self.path("watch_file", file_path)

    def k8s_yaml(self, yaml_, allow_duplicates=False):
        if isinstance(yaml_, Opaque):
            blobs = [expect(yaml_, "blob", "k8s_yaml")]
        else:
            blobs = []
            for p in str_list(yaml_, "k8s_yaml"):
                self.note(p)
                self.path("k8s_yaml", p, "file")
                with open(self.abs(p)) as f:
                    blobs.append(Opaque("blob", text=f.read(), source=p))
        for b in blobs:
            for obj in yaml.safe_load_all(b.text):
                if obj:
                    self.objects.append((b.source, obj))

    def k8s_resource(self, workload="", new_name="", port_forwards=(), extra_pod_selectors=(),
                     trigger_mode=None, resource_deps=(), objects=(), auto_init=True, pod_readiness="",
                     links=(), labels=(), discovery_strategy=""):
        self.note(workload, new_name, resource_deps, objects, labels)
        if not workload and not new_name:
            raise TiltfileError("k8s_resource: needs a workload or a new_name")
        port_forwards = list(port_forwards) if isinstance(port_forwards, (list, tuple)) else [port_forwards]
        self.k8s_resources.append(dict(
            workload=workload, name=new_name or workload, port_forwards=port_forwards,
            resource_deps=str_list(resource_deps, "k8s_resource resource_deps"),
            labels=str_list(labels, "k8s_resource labels"), objects=str_list(objects, "objects"),
            auto_init=auto_init, manual=trigger_mode is not None and trigger_mode.name == "MANUAL"))

    def port_forward(self, local_port, container_port=None, name=None, link_path=None, host=None):
        return opaque("port_forward", local=local_port, container=container_port or local_port)

    def local_resource(self, name, cmd="", deps=(), trigger_mode=None, resource_deps=(), ignore=(),
                       auto_init=True, serve_cmd="", cmd_bat="", serve_cmd_bat="", allow_parallel=False,
                       links=(), tags=(), env=None, serve_env=None, readiness_probe=None, dir="", serve_dir="",
                       labels=()):
        self.note(name, cmd, deps, resource_deps, serve_cmd, dir, serve_dir, labels)
        if not cmd and not serve_cmd:
            raise TiltfileError(f"local_resource({name!r}): needs a cmd or a serve_cmd")
        if readiness_probe is not None:
            expect(readiness_probe, "probe", f"local_resource({name!r}) readiness_probe")
            if not serve_cmd:
                raise TiltfileError(f"local_resource({name!r}): a readiness_probe needs a serve_cmd")
        for what, c, d in (("cmd", cmd, dir), ("serve_cmd", serve_cmd, serve_dir)):
            if d:
                self.path(f"local_resource({name!r}) {what} dir", d, "dir")
            argv = command_argv(c)
            if argv and "/" in argv[0]:
                self.path(f"local_resource({name!r}) {what}", os.path.join(d or ".", argv[0]), "exe")
        self.local_resources.append(dict(
            name=name, cmd=command_argv(cmd), serve_cmd=command_argv(serve_cmd),
            deps=str_list(deps, "local_resource deps"),
            resource_deps=str_list(resource_deps, "local_resource resource_deps"),
            probe=readiness_probe, labels=str_list(labels, "local_resource labels"), auto_init=auto_init,
            manual=trigger_mode is not None and trigger_mode.name == "MANUAL"))

    # --- probes ---
    def probe(self, initial_delay_secs=0, timeout_secs=1, period_secs=10, success_threshold=1,
              failure_threshold=3, exec=None, http_get=None, tcp_socket=None):
        actions = [(kind, a) for kind, a in (("exec_action", exec), ("http_get_action", http_get),
                                             ("tcp_socket_action", tcp_socket)) if a is not None]
        if len(actions) != 1:
            raise TiltfileError("probe: needs exactly one of exec, http_get and tcp_socket")
        kind, action = actions[0]
        return opaque("probe", action=expect(action, kind, "probe"), timeout_secs=timeout_secs)

    def exec_action(self, command):
        self.note(command)
        command = str_list(command, "exec_action command")
        if "/" in command[0]:
            self.path("exec_action", command[0], "exe")
        return opaque("exec_action", command=command)

    @staticmethod
    def tcp_socket_action(port, host=""):
        return opaque("tcp_socket_action", port=port, host=host)

    @staticmethod
    def http_get_action(port, host="", scheme="http", path=""):
        return opaque("http_get_action", port=port, host=host, scheme=scheme, path=path)

    # --- cluster ---
    def allow_k8s_contexts(self, contexts):
        self.contexts += str_list(contexts, "allow_k8s_contexts")

    @staticmethod
    def k8s_context():
        return "tilt-check"

    def default_registry(self, host, host_from_cluster=None, single_name=""):
        pass

    @staticmethod
    def warn(msg):
        print(f"  Tiltfile warns: {msg}")

    def builtins(self):
        """Name -> callable for the module; dotted names become structs in the prelude."""
        return {
            "config.define_string": self.define("string"),
            "config.define_bool": self.define("bool"),
            "config.define_string_list": self.define("string_list"),
            "config.parse": self.config_parse,
            "os.getenv": self.os_getenv,
            "os.getcwd": lambda: self.root,
            "os.path.join": os.path.join,
            "os.path.exists": self.os_path_exists,
            "os.path.basename": os.path.basename,
            "os.path.dirname": os.path.dirname,
            "os.path.abspath": lambda p: os.path.normpath(self.abs(p)),
            "docker_build": self.docker_build,
            "kustomize": self.kustomize,
            "local": self.local,
            "read_file": self.read_file,
            "watch_file": self.watch_file,
            "k8s_yaml": self.k8s_yaml,
            "k8s_resource": self.k8s_resource,
            "port_forward": self.port_forward,
            "local_resource": self.local_resource,
            "probe": self.probe,
            "exec_action": self.exec_action,
            "tcp_socket_action": self.tcp_socket_action,
            "http_get_action": self.http_get_action,
            "allow_k8s_contexts": self.allow_k8s_contexts,
            "k8s_context": self.k8s_context,
            "default_registry": self.default_registry,
            "warn": self.warn,
        }


KUBECTL_MISSING = (
    "neither kustomize nor kubectl is on PATH, and the Tiltfile's YAML comes from kustomize(): "
    "run infra/k8s/check.sh, which installs kubectl, or install kubectl 1.21+ or kustomize v4+ "
    "yourself (Debian bookworm's kubernetes-client, kubectl 1.20, bundles kustomize v2, which "
    "predates the flags the Tiltfile passes)")


def command_argv(c):
    if not c:
        return []
    return list(c) if isinstance(c, (list, tuple)) else shlex.split(c)


PRELUDE_PREFIX = "__tilt_stub_"


def prelude(builtins, root, tiltfile):
    """Starlark that binds Tilt's names (config.parse, os.path.join, ...) to the stubs."""
    tree = {}
    for dotted in builtins:
        *parents, leaf = dotted.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = PRELUDE_PREFIX + dotted.replace(".", "_")

    def render(node):
        return "struct(" + ", ".join(f"{k}={render(v) if isinstance(v, dict) else v}" for k, v in node.items()) + ")"

    lines = []
    for name, node in tree.items():
        if isinstance(node, dict):
            if name == "config":
                node = dict(node, main_dir=repr(root), main_path=repr(tiltfile), tilt_subcommand=repr("up"))
            if name == "os":
                node = dict(node, name=repr("posix"))
            lines.append(f"{name} = {render(node)}")
        else:
            lines.append(f"{name} = {node}")
    lines.append("TRIGGER_MODE_AUTO = " + PRELUDE_PREFIX + "trigger_auto")
    lines.append("TRIGGER_MODE_MANUAL = " + PRELUDE_PREFIX + "trigger_manual")
    return "\n".join(lines) + "\n"


def evaluate(root, tiltfile, args):
    """Runs the Tiltfile with the stubs; returns them, or raises sl.StarlarkError."""
    scratch = tempfile.mkdtemp(prefix="tilt-check-state.")
    try:
        stubs = Stubs(root, args, scratch)
        module = sl.Module()
        builtins = stubs.builtins()
        for dotted, fn in builtins.items():
            module.add_callable(PRELUDE_PREFIX + dotted.replace(".", "_"), fn)
        module[PRELUDE_PREFIX + "trigger_auto"] = opaque("trigger_mode", name="AUTO")
        module[PRELUDE_PREFIX + "trigger_manual"] = opaque("trigger_mode", name="MANUAL")
        # Go Starlark as Tilt configures it: top-level if/for, no f-strings or type annotations.
        dialect = sl.Dialect.standard()
        dialect.enable_top_level_stmt = True
        dialect.enable_f_strings = False
        dialect.enable_types = sl.DialectTypes.DISABLE
        dialect.enable_load = True
        globals_ = sl.Globals.extended_by([sl.LibraryExtension.StructType, sl.LibraryExtension.Print])
        sl.eval(module, sl.parse("<tilt builtins>", prelude(builtins, root, tiltfile), dialect), globals_)
        with open(tiltfile) as f:
            source = f.read()
        if PRELUDE_PREFIX in source:
            raise TiltfileError(f"the Tiltfile names the checker's own {PRELUDE_PREFIX}* names")

        def no_load(path):
            raise TiltfileError(f"load({path!r}): extensions are fetched over the network; inline what is needed")

        sl.eval(module, sl.parse(os.path.relpath(tiltfile, root), source, dialect), globals_,
                sl.FileLoader(no_load))
        return stubs
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# === assertions ===


class Report:
    def __init__(self):
        self.failures = []

    def check(self, ok, msg):
        if not ok:
            self.failures.append(msg)
        return ok


def check_paths(r, stubs, mode):
    for what, p, kind in stubs.paths:
        full = stubs.abs(p)
        if not os.path.exists(full):
            r.check(False, f"[{mode}] {what}: {p} does not exist")
        elif kind == "file":
            r.check(os.path.isfile(full), f"[{mode}] {what}: {p} is not a file")
        elif kind == "dir":
            r.check(os.path.isdir(full), f"[{mode}] {what}: {p} is not a folder")
        elif kind == "exe":
            r.check(os.path.isfile(full) and os.access(full, os.X_OK), f"[{mode}] {what}: {p} is not executable")
    # Paths inside strings (a command's `source infra/local/lib.sh`, say): every word that
    # starts with a top-level folder of the repository. target/ holds build outputs.
    tops = [d for d in os.listdir(stubs.root) if os.path.isdir(os.path.join(stubs.root, d))
            and not d.startswith(".") and d != "target"]
    word = re.compile(r"(?<![\w$./{-])((?:" + "|".join(map(re.escape, tops)) + r")/[\w./-]*\w)")
    for s in set(stubs.strings):
        for m in word.finditer(s):
            r.check(os.path.exists(stubs.abs(m.group(1))), f"[{mode}] {m.group(1)} (named in {s[:60]!r}) does not exist")


def check_graph(r, names, deps_of, labels_of, manual, mode):
    """resource_deps name resources, without cycles; REQUIRED holds; labels; no manual trigger."""
    for name, deps in deps_of.items():
        for d in deps:
            r.check(d in names, f"[{mode}] {name}: resource_deps names {d!r}, which is not a resource")
        r.check(bool(labels_of.get(name)), f"[{mode}] {name}: no labels")
        r.check(name not in manual, f"[{mode}] {name}: waits for a manual trigger or auto_init=False (tilt ci would not start it)")

    def reach(name, seen):
        for d in deps_of.get(name, []):
            if d not in seen:
                seen.add(d)
                reach(d, seen)
        return seen

    for name in deps_of:
        r.check(name not in reach(name, set()), f"[{mode}] {name}: its resource_deps lead back to it (a cycle)")
    for name, needs in required(mode).items():
        if name in names:
            got = reach(name, set())
            for n in needs:
                r.check(n in got, f"[{mode}] {name} does not wait for {n} (add it to resource_deps)")


def image_name(ref):
    ref = ref.split("@", 1)[0]
    last = ref.rsplit("/", 1)
    if ":" in last[-1]:
        ref = ref[: ref.rindex(":")]
    for prefix in ("docker.io/library/", "docker.io/", "index.docker.io/"):
        ref = ref.removeprefix(prefix)
    return ref


def pod_spec(obj):
    kind = obj.get("kind", "").lower()
    spec = obj.get("spec") or {}
    if kind == "pod":
        return spec
    if kind == "cronjob":
        return ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template", {}).get("spec") or {}
    return (spec.get("template") or {}).get("spec") or {}


def containers(obj):
    spec = pod_spec(obj)
    return (spec.get("initContainers") or []) + (spec.get("containers") or [])


def refs_of(obj):
    """(kind, name, key or None, optional) of every Secret and ConfigMap a workload reads."""
    spec = pod_spec(obj)
    out = []

    def source(kind, src, name_field):
        name = src.get(name_field)
        items = src.get("items") or []
        if not items:
            out.append((kind, name, None, bool(src.get("optional"))))
        for it in items:
            out.append((kind, name, it.get("key"), bool(src.get("optional"))))

    for v in spec.get("volumes") or []:
        if "secret" in v:
            source("Secret", v["secret"], "secretName")
        if "configMap" in v:
            source("ConfigMap", v["configMap"], "name")
        for p in (v.get("projected") or {}).get("sources") or []:
            if "secret" in p:
                source("Secret", p["secret"], "name")
            if "configMap" in p:
                source("ConfigMap", p["configMap"], "name")
    for c in containers(obj):
        for e in c.get("env") or []:
            vf = e.get("valueFrom") or {}
            for kind, field in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                if field in vf:
                    out.append((kind, vf[field].get("name"), vf[field].get("key"), bool(vf[field].get("optional"))))
        for ef in c.get("envFrom") or []:
            for kind, field in (("Secret", "secretRef"), ("ConfigMap", "configMapRef")):
                if field in ef:
                    out.append((kind, ef[field].get("name"), None, bool(ef[field].get("optional"))))
    return out


def dockerfile_facts(path):
    """The stage names and the context paths COPY/ADD read, of a Dockerfile."""
    stages, sources = set(), []
    with open(path) as f:
        text = re.sub(r"\\\n", " ", f.read())
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        op = words[0].upper()
        if op == "FROM" and len(words) >= 4 and words[-2].upper() == "AS":
            stages.add(words[-1])
        elif op in ("COPY", "ADD"):
            args = [w for w in words[1:] if not w.startswith("--")]
            if any(w.startswith("--from") for w in words[1:]) or len(args) < 2 or args[0].startswith("["):
                continue
            sources += [a.rstrip("/") for a in args[:-1] if "://" not in a]
    return stages, sources


def covered(path, only):
    """Whether a filtered context keeps something of PATH."""
    path = os.path.normpath(path)
    for o in only:
        o = os.path.normpath(o)
        if o == "." or path == o or path.startswith(o + "/") or o.startswith(path + "/") \
                or fnmatch.fnmatch(path, o):
            return True
    return False


def check_k8s(r, stubs):
    mode = "k8s"
    r.check(bool(stubs.kustomized), "[k8s] no kustomize() call")
    r.check("k8s/overlays/dev" in [os.path.normpath(p) for p in stubs.kustomized],
            "[k8s] the YAML does not come from kustomize('k8s/overlays/dev')")

    # Images and the Dockerfile.
    with open(os.path.join(stubs.root, "Cargo.toml"), "rb") as f:
        members = tomllib.load(f).get("workspace", {}).get("members", [])
    built = {}
    for b in stubs.docker_builds:
        built[image_name(b["ref"])] = b
        df = stubs.abs(b["dockerfile"])
        if not os.path.isfile(df):
            continue
        stages, sources = dockerfile_facts(df)
        r.check(not b["target"] or b["target"] in stages,
                f"[k8s] docker_build({b['ref']!r}): target {b['target']!r} is not a stage of {b['dockerfile']} ({sorted(stages)})")
        if b["only"]:
            for m in members:
                r.check(covered(m, b["only"]), f"[k8s] docker_build({b['ref']!r}): only= leaves out workspace member {m}")
            for s in sources:
                r.check(covered(s, b["only"]), f"[k8s] docker_build({b['ref']!r}): only= leaves out {s}, which {b['dockerfile']} copies")
    for s in SERVICES:
        r.check(f"convoy/{s}" in built, f"[k8s] no docker_build of convoy/{s}")

    workloads = [(src, o) for src, o in stubs.objects if o.get("kind", "").lower() in WORKLOAD_KINDS]
    used = {}
    for _, o in workloads:
        for c in containers(o):
            used.setdefault(image_name(c.get("image", "")), []).append(o["metadata"]["name"])
    for img in built:
        r.check(img in used, f"[k8s] image {img} is built but no container of the YAML uses it")
    for img, where in used.items():
        if img.startswith("convoy/"):
            r.check(img in built, f"[k8s] {', '.join(where)} use(s) image {img}, which no docker_build builds")

    # Workloads and their resources.
    def matches(spec, o):
        parts = spec.split(":")
        fields = [o["metadata"]["name"], o.get("kind", ""), o["metadata"].get("namespace", "default"),
                  o.get("apiVersion", "").rpartition("/")[0]]
        return all(not p or p.lower() == f.lower() for p, f in zip(parts, fields))

    resource_of = {}  # workload index -> resource
    names = {}
    for res in stubs.k8s_resources:
        r.check(res["name"] not in names, f"[k8s] resource {res['name']} defined twice")
        names[res["name"]] = res
        if not res["workload"]:
            continue
        hits = [i for i, (_, o) in enumerate(workloads) if matches(res["workload"], o)]
        if r.check(len(hits) == 1, f"[k8s] k8s_resource({res['workload']!r}) matches {len(hits)} workloads of the YAML, not 1"):
            resource_of[hits[0]] = res
            res["object"] = workloads[hits[0]][1]
    for i, (src, o) in enumerate(workloads):
        res = resource_of.get(i)
        what = f"{o['kind']} {o['metadata']['name']} (from {src})"
        if r.check(res is not None, f"[k8s] {what} has no k8s_resource"):
            bad = set(res["labels"]) - K8S_LABELS
            r.check(not bad, f"[k8s] {res['name']}: labels {sorted(bad)} are none of {sorted(K8S_LABELS)}")
    for lr in stubs.local_resources:
        names[lr["name"]] = lr
    deps_of = {n: res["resource_deps"] for n, res in names.items()}
    labels_of = {n: res["labels"] for n, res in names.items()}
    manual = {n for n, res in names.items() if res["manual"] or res["auto_init"] is False}
    check_graph(r, names, deps_of, labels_of, manual, mode)
    for name in fleet(mode) + list(UI_PORTS):
        r.check(name in names, f"[k8s] {name} has no resource")

    # Port forwards.
    for res in stubs.k8s_resources:
        obj = res.get("object")
        if obj is None:
            continue
        declared = {p.get("containerPort") for c in containers(obj) for p in c.get("ports") or []}
        forwarded = set()
        for pf in res["port_forwards"]:
            if isinstance(pf, Opaque):
                local_port, container_port = pf.local, pf.container
            elif isinstance(pf, int):
                local_port = container_port = pf
            else:
                parts = str(pf).split(":")
                if not r.check(all(p.isdigit() for p in parts[-2:]) and len(parts) <= 3,
                               f"[k8s] {res['name']}: port forward {pf!r} is not LOCAL[:CONTAINER]"):
                    continue
                local_port, container_port = int(parts[-2] if len(parts) > 1 else parts[0]), int(parts[-1])
            forwarded.add(local_port)
            r.check(container_port in declared,
                    f"[k8s] {res['name']}: port forward to {container_port}, which no container declares ({sorted(declared)})")
        want = LOCAL_GRPC_PORTS.get(res["name"]) or UI_PORTS.get(res["name"])
        if want:
            r.check(want in forwarded, f"[k8s] {res['name']}: port {want} is not forwarded")

    # Secrets and ConfigMaps the workloads read.
    have = {}
    for _, o in stubs.objects:
        if o.get("kind") in ("Secret", "ConfigMap"):
            keys = set((o.get("data") or {}).keys()) | set((o.get("stringData") or {}).keys()) \
                | set((o.get("binaryData") or {}).keys())
            have[(o["kind"], o["metadata"]["name"], o["metadata"].get("namespace", "default"))] = keys
    for _, o in workloads:
        ns = o["metadata"].get("namespace", "default")
        for kind, name, key, optional in refs_of(o):
            if optional:
                continue
            keys = have.get((kind, name, ns))
            if r.check(keys is not None, f"[k8s] {o['kind']} {o['metadata']['name']} reads {kind} {name}, which is not applied in namespace {ns}"):
                r.check(key is None or key in keys, f"[k8s] {o['kind']} {o['metadata']['name']} reads key {key} of {kind} {name}, which has {sorted(keys)}")


def check_local(r, stubs, root):
    mode = "local"
    r.check(not stubs.docker_builds, "[local] docker_build in local mode (no cluster, no images)")
    r.check(not stubs.objects and not stubs.k8s_resources, "[local] Kubernetes YAML or k8s_resource in local mode")
    names = {}
    for lr in stubs.local_resources:
        r.check(lr["name"] not in names, f"[local] resource {lr['name']} defined twice")
        names[lr["name"]] = lr
    for name in fleet(mode):
        lr = names.get(name)
        if not r.check(lr is not None, f"[local] {name} is not a local_resource"):
            continue
        r.check(bool(lr["serve_cmd"]), f"[local] {name}: no serve_cmd (Tilt must own the process)")
        r.check(lr["probe"] is not None, f"[local] {name}: no readiness_probe (resources waiting for it would start at once)")
        bad = set(lr["labels"]) - LOCAL_LABELS
        r.check(not bad, f"[local] {name}: labels {sorted(bad)} are none of {sorted(LOCAL_LABELS)}")
        action = lr["probe"].action if lr["probe"] is not None else None
        if action is not None and action.kind == "exec_action" and os.path.isfile(stubs.abs(action.command[0])):
            # Not up here, so 1 is the expected answer; 2 and above: it did not understand.
            run = subprocess.run(action.command, check=False, cwd=root, capture_output=True, text=True,
                                 env=dict(os.environ, CONVOY_STATE_DIR=os.path.join(tempfile.gettempdir(), "tilt-check-none")))
            r.check(run.returncode in (0, 1), f"[local] {name}: probe {action.command} exited {run.returncode}: {run.stderr.strip()[-300:]}")
    build = names.get("build")
    if r.check(build is not None, "[local] no local_resource('build')"):
        argv = build["cmd"]
        r.check(argv[:2] == ["cargo", "build"], f"[local] build: cmd is not `cargo build ...`: {argv}")
        packages = {argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("-p", "--package")}
        for s in SERVICES:
            r.check(s in packages, f"[local] build: does not build -p {s}")
        for lr in stubs.local_resources:
            for d in lr["deps"]:
                if d.split("/")[0] == "target" or (os.path.isabs(d) and not os.path.exists(d)):
                    # A build output: a binary of the build, and the resource waits for it.
                    r.check(os.path.basename(d) in packages, f"[local] {lr['name']}: deps {d} is not a binary the build makes")
                    r.check(lr["name"] == "build" or "build" in lr["resource_deps"], f"[local] {lr['name']}: deps on {d} but no resource_deps on build")
                else:
                    r.check(os.path.exists(stubs.abs(d)), f"[local] {lr['name']}: deps {d} does not exist")
    deps_of = {n: lr["resource_deps"] for n, lr in names.items()}
    labels_of = {n: lr["labels"] for n, lr in names.items()}
    manual = {n for n, lr in names.items() if lr["manual"] or lr["auto_init"] is False}
    check_graph(r, names, deps_of, labels_of, manual, mode)


def summary(stubs):
    return (sorted(b["ref"] for b in stubs.docker_builds),
            sorted((x["name"], tuple(x["resource_deps"]), tuple(x["labels"]), tuple(map(str, x["port_forwards"])))
                   for x in stubs.k8s_resources),
            sorted(x["name"] for x in stubs.local_resources))


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=os.path.normpath(os.path.join(here, "..", "..")))
    ap.add_argument("--tiltfile")
    opts = ap.parse_args()
    root = os.path.abspath(opts.root)
    tiltfile = os.path.abspath(opts.tiltfile or os.path.join(root, "Tiltfile"))
    r = Report()

    runs = {}
    for label, args in (("default", []), ("k8s", ["--mode=k8s"]), ("local", ["--mode=local"])):
        try:
            runs[label] = evaluate(root, tiltfile, args)
        except (sl.StarlarkError, TiltfileError) as e:
            r.check(False, f"[{label}] the Tiltfile does not evaluate with {args}:\n{e}")
    try:
        evaluate(root, tiltfile, ["--mode=no-such-mode"])
        r.check(False, "[mode] --mode=no-such-mode evaluates; it should fail")
    except (sl.StarlarkError, TiltfileError):
        pass

    if "default" in runs and "k8s" in runs:
        r.check(summary(runs["default"]) == summary(runs["k8s"]), "[k8s] the default mode is not --mode=k8s")
    if "k8s" in runs:
        check_paths(r, runs["k8s"], "k8s")
        check_k8s(r, runs["k8s"])
    if "local" in runs:
        check_paths(r, runs["local"], "local")
        check_local(r, runs["local"], root)

    if r.failures:
        for f in r.failures:
            print(f"FAIL {f}", file=sys.stderr)
        print(f"infra/tilt/check.py: {len(r.failures)} failure(s) in {os.path.relpath(tiltfile, root)}", file=sys.stderr)
        return 1
    k8s, local = runs["k8s"], runs["local"]
    print(f"ok: k8s mode: {len(k8s.docker_builds)} images, {len(k8s.objects)} objects, "
          f"{len(k8s.k8s_resources)} resources; local mode: {len(local.local_resources)} resources")
    return 0


if __name__ == "__main__":
    sys.exit(main())
