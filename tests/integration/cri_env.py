"""A private containerd (Debian's 1.6, its CRI plugin, runc, the CNI bridge
plugin) with shimlet-hook registered through deploy/containerd's
base_runtime_spec, and shimlet-cri in front of it (confined as its systemd
unit confines it); a Python CRI client
generated at run time from cri/api.proto (python3-grpcio, grpc_tools).

Everything lives under one private temp dir (containerd's root, state,
sockets, config, CNI config and IPAM, runc root, images, the hook's state
dir); the bridge and subnet names are unique per run. Cleanup stops and
removes every pod this environment made (through containerd directly), then
stops containerd and shimlet-cri, unmounts what is left under the dir and
deletes the bridge: also when a test or the set-up failed.
(/work/shared/reference/containerd-cri.md has the recipe and its traps.)"""
import contextlib
import hashlib
import importlib
import io
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import uuid

from containers import BIN, REPO, make_rootfs, run, wait_for

CRI = os.path.join(BIN, "shimlet-cri")
# As deploy/systemd/shimlet-cri.service runs it: root without capabilities, no_new_privs, in user and network
# namespaces of its own (PrivateUsers=: only root mapped; PrivateNetwork=). unshare and setpriv exec, so the
# process is shimlet-cri's.
CONFINED = ["unshare", "--user", "--map-root-user", "--net", "--", "setpriv", "--no-new-privs", "--inh-caps=-all",
            "--ambient-caps=-all", "--bounding-set=-all", "--"]
HOOK = os.path.join(BIN, "shimlet-hook")
PAUSE_IMAGE = "localhost/pause:1"
BUSYBOX_IMAGE = "localhost/busybox:1"
POD_NS = "default"


def generate_client(outdir):
    """runtime.v1 stubs from cri/api.proto + cri/streaming.proto (the same files the C++ build uses)."""
    for m in ("grpc", "grpc_tools"):
        try:
            importlib.import_module(m)
        except ImportError as e:
            raise AssertionError(f"python3 module {m} missing: install python3-grpcio python3-grpc-tools "
                                 f"(scripts/deps): {e}")
    os.makedirs(outdir, exist_ok=True)
    p = subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", os.path.join(REPO, "cri"),
                        f"--python_out={outdir}", f"--grpc_python_out={outdir}", "api.proto", "streaming.proto"],
                       capture_output=True)
    assert p.returncode == 0, p.stderr.decode()
    sys.path.insert(0, outdir)
    try:
        import api_pb2, api_pb2_grpc, streaming_pb2  # noqa: E401
    finally:
        sys.path.remove(outdir)
    for k, v in vars(streaming_pb2).items():  # one namespace for every runtime.v1 message
        if not k.startswith("_") and not hasattr(api_pb2, k):
            setattr(api_pb2, k, v)
    return api_pb2, api_pb2_grpc, streaming_pb2


def oci_archive(path, rootfs, names):
    """An OCI image-layout tar of one uncompressed layer (rootfs), named by
    each of `names` (what `ctr images import` reads; no registry, no podman)."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.PAX_FORMAT) as t:
        t.add(rootfs, arcname=".")
    layer = layer.getvalue()

    def blob(data, media):
        return {"mediaType": media, "digest": "sha256:" + hashlib.sha256(data).hexdigest(), "size": len(data)}, data

    lay_desc, _ = blob(layer, "application/vnd.oci.image.layer.v1.tar")
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Cmd": ["/bin/sleep", "infinity"], "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]},
                         "rootfs": {"type": "layers", "diff_ids": [lay_desc["digest"]]}}).encode()
    cfg_desc, _ = blob(config, "application/vnd.oci.image.config.v1+json")
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": cfg_desc, "layers": [lay_desc]}).encode()
    man_desc, _ = blob(manifest, "application/vnd.oci.image.manifest.v1+json")
    index = {"schemaVersion": 2, "manifests": [
        dict(man_desc, annotations={"io.containerd.image.name": n, "org.opencontainers.image.ref.name": n.split(":")[-1]})
        for n in names]}
    with tarfile.open(path, "w") as t:
        def add(name, data):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add("index.json", json.dumps(index).encode())
        for d, data in ((lay_desc, layer), (cfg_desc, config), (man_desc, manifest)):
            add("blobs/sha256/" + d["digest"].split(":")[1], data)


def free_subnet():
    """A 10.x.y.0/24 no route on this host overlaps (parallel runs pick apart)."""
    routes = run(["ip", "-4", "route", "show"]).stdout.decode().split()
    nets = [ipaddress.ip_network(w, strict=False) for w in routes if "/" in w and w[0].isdigit()]
    for _ in range(200):
        n = ipaddress.ip_network(f"10.{200 + int.from_bytes(os.urandom(1), 'big') % 50}."
                                 f"{int.from_bytes(os.urandom(1), 'big')}.0/24")
        if not any(n.overlaps(o) for o in nets):
            return n
    raise AssertionError("no free 10.x.y.0/24 subnet for the CNI bridge")


class CriEnv:
    def __init__(self, hook_config=None):
        for b in (CRI, HOOK, os.path.join(BIN, "shimlet"), os.path.join(BIN, "shimlet-session")):
            if not os.access(b, os.X_OK):
                raise AssertionError(f"{b} missing: build first (scripts/build)")
        for t in ("containerd", "ctr", "runc"):
            if not shutil.which(t):
                raise AssertionError(f"{t} missing: install containerd runc (scripts/deps)")
        if not os.path.exists("/usr/lib/cni/bridge"):
            raise AssertionError("/usr/lib/cni/bridge missing: install containernetworking-plugins (scripts/deps)")
        self.dir = tempfile.mkdtemp(prefix="shimlet-cri-")
        self.tag = uuid.uuid4().hex[:8]
        self.bridge = "scri" + self.tag  # 12 chars (IFNAMSIZ 15)
        self.state = os.path.join(self.dir, "state")  # the hook's state dir
        self.containerd_sock = os.path.join(self.dir, "containerd.sock")
        self.cri_sock = os.path.join(self.dir, "cri.sock")
        self.procs = {}
        self.pods = []  # sandbox ids made here, removed at cleanup
        # clock_leeway_s 1: an expired URL is refused within seconds (test_cri's expiry case).
        self.hook_config = {"state_dir": self.state, "fail_container_on_error": True, "cri_listen": "127.0.0.1:0",
                            "clock_leeway_s": 1, **(hook_config or {})}
        self._stubs = None
        self._channels = []

    # ---- set-up

    def start(self):
        d = self.dir
        for sub in ("cni", "logs", "podlogs", "img"):
            os.makedirs(os.path.join(d, sub))
        self.api, self.api_grpc, self.streaming = generate_client(os.path.join(d, "py"))
        subnet = free_subnet()
        with open(os.path.join(d, "cni", "10-shimlet.conflist"), "w") as f:
            json.dump({"cniVersion": "1.0.0", "name": "shimlet-" + self.tag, "plugins": [
                {"type": "bridge", "bridge": self.bridge, "isGateway": True, "ipMasq": False,
                 "ipam": {"type": "host-local", "ranges": [[{"subnet": str(subnet)}]], "routes": [{"dst": "0.0.0.0/0"}],
                          "dataDir": os.path.join(d, "cni-ipam")}},
                {"type": "loopback"}]}, f)
        with open(os.path.join(d, "hook.json"), "w") as f:
            json.dump(self.hook_config, f)
        # The shipped spec template, rendered as an operator would (scripts/install-hooks).
        self.spec = os.path.join(d, "base_runtime_spec.json")
        run([os.path.join(REPO, "scripts", "install-hooks"), "--containerd", self.spec, BIN,
             os.path.join(d, "hook.json")])
        self.write_config()
        rootfs = make_rootfs(os.path.join(d, "img", "rootfs"))
        oci_archive(os.path.join(d, "img", "images.tar"), rootfs, [PAUSE_IMAGE, BUSYBOX_IMAGE])
        self.start_containerd()
        run(["ctr", "--address", self.containerd_sock, "-n", "k8s.io", "images", "import",
             os.path.join(d, "img", "images.tar")])
        self.start_cri()
        return self

    def write_config(self):
        d = self.dir
        with open(os.path.join(d, "config.toml"), "w") as f:
            f.write(f"""version = 2
root = "{d}/root"
state = "{d}/cstate"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]
[grpc]
  address = "{self.containerd_sock}"
[ttrpc]
  address = "{self.containerd_sock}.ttrpc"
[debug]
  level = "warn"
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  enable_selinux = false
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      base_runtime_spec = "{self.spec}"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "/usr/sbin/runc"
        Root = "{d}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni"
    max_conf_num = 1
""")

    def _spawn(self, name, argv):
        log = open(os.path.join(self.dir, "logs", name + ".log"), "ab")
        self.procs[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                            start_new_session=True)
        log.close()
        return self.procs[name]

    def start_containerd(self):
        p = self._spawn("containerd", ["containerd", "--config", os.path.join(self.dir, "config.toml")])

        def up():
            assert p.poll() is None, f"containerd exited {p.returncode}: {self.log('containerd')[-3000:]}"
            return run(["ctr", "--address", self.containerd_sock, "version"], check=False).returncode == 0
        wait_for(up, 30, "containerd to answer")

    def stop_containerd(self, sig=signal.SIGTERM):
        p = self.procs.pop("containerd", None)
        if p and p.poll() is None:
            os.kill(p.pid, sig)
            p.wait(timeout=30)

    def start_cri(self, *extra):
        p = self._spawn("cri", [*CONFINED, CRI, "--listen", self.cri_sock, "--runtime-endpoint",
                                "unix://" + self.containerd_sock, "--state-dir", self.state, "-v", *extra])

        def up():
            assert p.poll() is None, f"shimlet-cri exited {p.returncode}: {self.log('cri')[-3000:]}"
            return os.path.exists(self.cri_sock)
        wait_for(up, 30, "shimlet-cri's socket")
        # wait_for_ready: the socket file may be the stopped proxy's until the new one binds.
        self.rt(self.cri_sock).Version(self.api.VersionRequest(), timeout=30, wait_for_ready=True)

    def stop_cri(self):
        p = self.procs.pop("cri", None)
        if p and p.poll() is None:
            os.kill(p.pid, signal.SIGTERM)
            p.wait(timeout=30)
            assert p.returncode == 0, f"shimlet-cri exited {p.returncode}: {self.log('cri')[-3000:]}"

    def log(self, name):
        with open(os.path.join(self.dir, "logs", name + ".log"), "rb") as f:
            return f.read().decode(errors="replace")

    # ---- clients

    def channel(self, sock):
        import grpc
        # A channel of its own subchannels: gRPC's global pool would hand a new
        # channel the broken connection to a server the test just restarted.
        ch = grpc.insecure_channel("unix://" + sock, options=[("grpc.max_receive_message_length", 64 << 20),
                                                              ("grpc.use_local_subchannel_pool", 1)])
        self._channels.append(ch)
        return ch

    def rt(self, sock):
        return self.api_grpc.RuntimeServiceStub(self.channel(sock))

    def img(self, sock):
        return self.api_grpc.ImageServiceStub(self.channel(sock))

    @property
    def proxy(self):
        return self.rt(self.cri_sock)

    @property
    def direct(self):
        return self.rt(self.containerd_sock)

    # ---- pods

    def sandbox_config(self, name):
        a = self.api
        return a.PodSandboxConfig(
            metadata=a.PodSandboxMetadata(name=name, uid=uuid.uuid4().hex, namespace=POD_NS),
            hostname=name, log_directory=os.path.join(self.dir, "podlogs", name),
            linux=a.LinuxPodSandboxConfig(security_context=a.LinuxSandboxSecurityContext(
                namespace_options=a.NamespaceOption(network=a.POD, pid=a.CONTAINER, ipc=a.POD))))

    def run_pod(self, name, containers):
        """A pod through shimlet-cri, as the kubelet makes one: {container name: argv}. Returns (sandbox id, {name: id})."""
        a, rt = self.api, self.proxy
        cfg = self.sandbox_config(name)
        sid = rt.RunPodSandbox(a.RunPodSandboxRequest(config=cfg), timeout=60).pod_sandbox_id
        self.pods.append(sid)
        ids = {}
        for cname, argv in containers.items():
            cc = a.ContainerConfig(metadata=a.ContainerMetadata(name=cname), image=a.ImageSpec(image=BUSYBOX_IMAGE),
                                   command=list(argv), log_path=cname + ".log",
                                   linux=a.LinuxContainerConfig(security_context=a.LinuxContainerSecurityContext(
                                       namespace_options=a.NamespaceOption(network=a.POD, pid=a.CONTAINER,
                                                                           ipc=a.POD))))
            cid = rt.CreateContainer(a.CreateContainerRequest(pod_sandbox_id=sid, config=cc, sandbox_config=cfg),
                                     timeout=60).container_id
            rt.StartContainer(a.StartContainerRequest(container_id=cid), timeout=60)
            ids[cname] = cid
            wait_for(lambda: self.registration(cid), 10, f"the shim of {cname} ({cid}) to register")
        return sid, ids

    def remove_pod(self, sid, via_proxy=False):
        a, rt = self.api, self.proxy if via_proxy else self.direct
        rt.StopPodSandbox(a.StopPodSandboxRequest(pod_sandbox_id=sid), timeout=60)
        rt.RemovePodSandbox(a.RemovePodSandboxRequest(pod_sandbox_id=sid), timeout=60)
        with contextlib.suppress(ValueError):
            self.pods.remove(sid)

    def registration(self, cid):
        with contextlib.suppress(OSError, ValueError):
            with open(os.path.join(self.state, cid, "registration.json")) as f:
                return json.load(f)
        return None

    # ---- teardown

    def cleanup(self):
        errors = []
        if self.procs.get("containerd") is None and self.pods:
            with contextlib.suppress(Exception):
                self.start_containerd()  # a test stopped it: the pods need it to go
        for sid in list(self.pods):
            try:
                self.remove_pod(sid)
            except Exception as e:  # noqa: BLE001 (keep cleaning)
                errors.append(f"pod {sid}: {e}")
        for ch in self._channels:
            with contextlib.suppress(Exception):
                ch.close()
        for name in ("cri", "containerd"):
            p = self.procs.pop(name, None)
            if p and p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout=10)
        # Mounts containerd left under our dir (only after a failure), deepest first.
        with open("/proc/self/mounts") as f:
            mounts = [l.split()[1] for l in f if l.split()[1].startswith(self.dir + "/")]
        for m in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", m], capture_output=True)
        if mounts:
            errors.append(f"mounts left under {self.dir}: {mounts}")
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
        # Shims whose container is gone (a failed poststop) die with the test.
        if os.path.isdir(self.state):
            for cid in os.listdir(self.state):
                reg = self.registration(cid)
                if reg:
                    with contextlib.suppress(OSError):
                        with open(f"/proc/{reg['shim_pid']}/cmdline", "rb") as f:
                            if self.state.encode() in f.read():
                                os.kill(reg["shim_pid"], signal.SIGKILL)
        shutil.rmtree(self.dir, ignore_errors=True)
        # runc's cgroupfs parents /sys/fs/cgroup/*/k8s.io stay: shared with any
        # other containerd on the host (empty ones are harmless).
        return errors
