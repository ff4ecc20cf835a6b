"""Start a real ComfyUI with this pack and the fixture checkpoints, and talk to it over loopback HTTP (stdlib).

Used by tests/test_comfyui_live.py; also runnable by hand (e.g. for the browser check)::

    COMFYUI_PATH=/path/to/ComfyUI COMFYUI_PYTHON=/path/to/ComfyUI/.venv/bin/python \\
        python tests/comfyui_server.py [--port 8188] [--base DIR]

starts the server (CPU, temporary base/input/output folders, the fixtures under a 'uniar' model folder), prints
its URL and keeps it running until Ctrl-C.

Environment: ``COMFYUI_PATH`` (a ComfyUI source tree, required), ``COMFYUI_PYTHON`` (an interpreter with
ComfyUI's requirements and this pack's; default: the current one), ``UNIAR_SHARED`` (default ``<repo>/../shared``),
``COMFYUI_FRONTEND_ROOT`` (optional: another frontend's ``static`` folder, passed as ``--front-end-root``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.environ.get("UNIAR_SHARED", os.path.join(os.path.dirname(ROOT), "shared"))
FIXTURES = os.path.join(SHARED, "fixtures")
TEST_IMAGE = os.path.join(FIXTURES, "golden", "test_image.png")
FIXTURE_CKPTS = ("uniar-tiny", "uniar-tiny-bsq64")
API_DIR = os.path.join(ROOT, "tests", "comfy_api")
INPUT_IMAGE_NAME = "uniar_test.png"  # the LoadImage file the API workflows use
# A custom-node file that makes a CPU run build comfy.ops layers the way dynamic VRAM does (lazy weights).
SIM_DYNAMIC_VRAM = os.path.join(SHARED, "tools", "sim_dynamic_vram.py")
PACK_DIR_NAME = "uniar-nodes"  # the folder name a git clone or the registry gives the pack


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """A ComfyUI process on 127.0.0.1 with a temporary base directory."""

    def __init__(self, comfy_path: str, python: str | None = None, port: int | None = None, base: str | None = None,
                 extra_args=(), extra_custom_nodes=(), extra_custom_node_dirs=(), extra_env=None):
        self.comfy_path = os.path.abspath(comfy_path)
        self.python = python or sys.executable
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._own_base = base is None
        self.base = base or tempfile.mkdtemp(prefix="uniar-comfy-")
        self.extra_args = list(extra_args)
        self.extra_custom_nodes = list(extra_custom_nodes)  # single-file custom nodes copied beside the pack
        # whole custom-node packs (folders) copied beside the pack, one private copy per server (a pack that keeps
        # its settings inside its own folder then cannot mix two servers' settings)
        self.extra_custom_node_dirs = list(extra_custom_node_dirs)
        self.extra_env = dict(extra_env or {})  # added to the server's environment
        self.proc = None
        self.log_path = os.path.join(self.base, "comfyui.log")

    # ------------------------------------------------------------------ folders
    def prepare(self) -> None:
        b = self.base
        for d in ("custom_nodes", "input", "output", "temp", "user", "models", "uniar_models"):
            os.makedirs(os.path.join(b, d), exist_ok=True)
        link = os.path.join(b, "custom_nodes", PACK_DIR_NAME)
        if not os.path.lexists(link):
            os.symlink(ROOT, link, target_is_directory=True)
        for name in FIXTURE_CKPTS:
            dst = os.path.join(b, "uniar_models", name)
            if not os.path.lexists(dst):
                os.symlink(os.path.join(FIXTURES, name), dst, target_is_directory=True)
        shutil.copyfile(TEST_IMAGE, os.path.join(b, "input", INPUT_IMAGE_NAME))
        for f in self.extra_custom_nodes:
            shutil.copyfile(f, os.path.join(b, "custom_nodes", "zz_" + os.path.basename(f)))
        for d in self.extra_custom_node_dirs:
            dst = os.path.join(b, "custom_nodes", os.path.basename(os.path.normpath(d)))
            if not os.path.exists(dst):
                shutil.copytree(d, dst, ignore=shutil.ignore_patterns(".git", "__pycache__", "gpu_config.json"))
        with open(os.path.join(b, "extra_model_paths.yaml"), "w", encoding="utf-8") as f:
            f.write(f"uniar_fixtures:\n  uniar: {os.path.join(b, 'uniar_models')}\n")

    def command(self) -> list[str]:
        b = self.base
        fe = os.environ.get("COMFYUI_FRONTEND_ROOT")
        return [self.python, os.path.join(self.comfy_path, "main.py"), "--cpu", "--listen", "127.0.0.1",
                "--port", str(self.port), "--base-directory", b,
                "--extra-model-paths-config", os.path.join(b, "extra_model_paths.yaml"),
                "--database-url", "sqlite:///:memory:", "--disable-auto-launch",
                *(["--front-end-root", fe] if fe else []), *self.extra_args]

    # ------------------------------------------------------------------ process
    def start(self, timeout: float = 180) -> "ComfyServer":
        self.prepare()
        env = dict(os.environ)
        env.setdefault("HF_HUB_OFFLINE", "1")  # the pack never needs the network here
        env.setdefault("OMP_NUM_THREADS", "2")
        env.update(self.extra_env)
        self._log = open(self.log_path, "w", encoding="utf-8")
        self.proc = subprocess.Popen(self.command(), cwd=self.comfy_path, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} during start-up:\n{self.log_tail()}")
            try:
                if self.get("/system_stats", timeout=5)[0] == 200:
                    return self
            except OSError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def cleanup(self) -> None:
        self.stop()
        if self._own_base:
            shutil.rmtree(self.base, ignore_errors=True)

    def log_text(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    # ------------------------------------------------------------------ HTTP
    def _request(self, path, data=None, timeout=30):
        req = urllib.request.Request(self.url + path)
        if data is not None:
            req.data = json.dumps(data).encode()
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
                return r.status, body
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get(self, path, timeout=30):
        code, body = self._request(path, timeout=timeout)
        try:
            return code, json.loads(body) if body else None
        except ValueError:
            return code, body.decode(errors="replace")

    def post(self, path, data, timeout=30):
        code, body = self._request(path, data, timeout=timeout)
        try:
            return code, json.loads(body) if body else None
        except ValueError:
            return code, body.decode(errors="replace")

    def view(self, item: dict) -> bytes:
        q = urllib.parse.urlencode({k: item.get(k, "") for k in ("filename", "subfolder", "type")})
        code, body = self._request("/view?" + q)
        if code != 200:
            raise RuntimeError(f"/view {q} -> HTTP {code}")
        return body

    def queue(self, prompt: dict) -> tuple[int, dict]:
        return self.post("/prompt", {"prompt": prompt, "client_id": str(uuid.uuid4())})

    def wait(self, prompt_id: str, timeout: float = 300) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            code, hist = self.get("/history/" + prompt_id)
            if code == 200 and isinstance(hist, dict) and prompt_id in hist:
                entry = hist[prompt_id]
                if entry.get("status", {}).get("completed") is not None or entry.get("outputs"):
                    return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log_tail()}")
            time.sleep(0.3)
        self.post("/queue", {"delete": [prompt_id]})
        self.post("/interrupt", {})
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout}s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        code, resp = self.queue(prompt)
        if code != 200:
            raise AssertionError(f"/prompt rejected the workflow (HTTP {code}): {json.dumps(resp)[:2000]}")
        return self.wait(resp["prompt_id"], timeout)

    def output_path(self, item: dict) -> str:
        return os.path.join(self.base, item.get("type", "output"), item.get("subfolder", ""), item["filename"])


def live_server(comfy_path: str, python: str, extra_custom_nodes=(), extra_args=()):
    """A started :class:`ComfyServer` for a pytest fixture (``yield from``): fails clearly for a path that is no
    ComfyUI tree, cleans up after; ``UNIAR_SHOW_COMFY_LOG=1`` prints the log when it holds a traceback."""
    import pytest

    if not os.path.isfile(os.path.join(comfy_path, "main.py")):
        pytest.fail(f"COMFYUI_PATH={comfy_path} is not a ComfyUI source tree (no main.py)")
    srv = ComfyServer(comfy_path, python, extra_custom_nodes=extra_custom_nodes, extra_args=extra_args)
    try:
        srv.start(timeout=240)
        yield srv
    finally:
        log = srv.log_text()
        srv.cleanup()
        if "Traceback" in log and os.environ.get("UNIAR_SHOW_COMFY_LOG"):
            print(log)


def skip_without_dynamic_vram(comfy_path: str) -> None:
    import pytest

    if not os.path.isfile(os.path.join(comfy_path, "comfy", "memory_management.py")):
        pytest.skip("this ComfyUI release has no dynamic VRAM (comfy/memory_management.py appeared in 0.28)")


def load_api_workflow(name: str) -> dict:
    with open(os.path.join(API_DIR, name if name.endswith(".json") else name + ".json"), encoding="utf-8") as f:
        return json.load(f)


def execution_error(entry: dict) -> dict | None:
    for event, data in entry.get("status", {}).get("messages", []):
        if event == "execution_error":
            return data
    return None


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="start ComfyUI with the UniAR pack and the fixture checkpoints")
    p.add_argument("--port", type=int, default=8188)
    p.add_argument("--base", help="base directory (default: a temporary one, removed on exit)")
    p.add_argument("--sim-dynamic-vram", action="store_true",
                   help="build comfy.ops layers the way dynamic VRAM does (lazy weights), without a GPU")
    a = p.parse_args(argv)
    comfy = os.environ.get("COMFYUI_PATH")
    if not comfy:
        print("set COMFYUI_PATH to a ComfyUI source tree", file=sys.stderr)
        return 2
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if s.connect_ex(("127.0.0.1", a.port)) == 0:
            print(f"port {a.port} is already in use", file=sys.stderr)
            return 2
    import signal

    def _stop(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    srv = ComfyServer(comfy, os.environ.get("COMFYUI_PYTHON"), a.port, a.base,
                      extra_custom_nodes=[SIM_DYNAMIC_VRAM] if a.sim_dynamic_vram else [])
    try:
        srv.start()
        print(f"ComfyUI with UniAR at {srv.url} (base {srv.base}, log {srv.log_path}); Ctrl-C stops it", flush=True)
        while srv.proc.poll() is None:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        srv.cleanup() if not a.base else srv.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
