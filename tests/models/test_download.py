"""resolve_weights and the downloader, against a real HTTP server on 127.0.0.1."""

import http.server
import os
import socket
import subprocess
import sys
import threading

import pytest

from bit_transfer.errors import WeightsError
from bit_transfer.models.weights import download as dl
from bit_transfer.models import resolve_weights

PAYLOAD = os.urandom(3 * dl.CHUNK + 12345)


class Handler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD at any path ending in .npz, honouring `Range: bytes=N-` unless told not to."""

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, self.headers.get("Range")))
        if not self.path.endswith(".npz"):
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and server.ranges:
            start = int(rng.split("=")[1].rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        else:
            self.send_response(200)
        body = PAYLOAD[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.cut_after is not None:  # promise everything, send part, hang up
            self.wfile.write(body[: server.cut_after])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.requests, httpd.ranges, httpd.cut_after = [], True, None
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_url_downloads_into_the_cache_once(server, tmp_path):
    path = resolve_weights(f"{server.url}/models/w.npz", "BiT-M-R50x1", cache_dir=tmp_path)
    assert path == tmp_path / "weights" / "w.npz" and path.read_bytes() == PAYLOAD
    assert not (tmp_path / "weights" / "w.npz.part").exists()
    assert resolve_weights(f"{server.url}/models/w.npz", "BiT-M-R50x1", cache_dir=tmp_path) == path
    assert len(server.requests) == 1  # second call is a cache hit


def test_auto_uses_the_official_name_and_bit_transfer_home(server, home, monkeypatch):
    monkeypatch.setattr(dl, "OFFICIAL_URL", server.url + "/bit_models/{}.npz")
    path = resolve_weights("auto", "bit-m-r50x1")
    assert path == home / "weights" / "BiT-M-R50x1.npz" and path.read_bytes() == PAYLOAD
    assert server.requests[0][0] == "/bit_models/BiT-M-R50x1.npz"
    resolve_weights("BiT-M-R101x3-ILSVRC2012", "ignored")
    assert server.requests[1][0] == "/bit_models/BiT-M-R101x3-ILSVRC2012.npz"


def test_a_part_file_is_resumed_with_a_range_request(server, tmp_path):
    part = tmp_path / "weights" / "w.npz.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(PAYLOAD[:1000])
    path = resolve_weights(f"{server.url}/w.npz", "x", cache_dir=tmp_path)
    assert server.requests == [("/w.npz", "bytes=1000-")]
    assert path.read_bytes() == PAYLOAD and not part.exists()


def test_a_server_ignoring_range_restarts_cleanly(server, tmp_path):
    server.ranges = False
    part = tmp_path / "weights" / "w.npz.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"stale bytes")
    assert resolve_weights(f"{server.url}/w.npz", "x", cache_dir=tmp_path).read_bytes() == PAYLOAD


def test_a_broken_transfer_keeps_the_part_and_the_next_run_resumes(server, tmp_path):
    server.cut_after = dl.CHUNK + 10
    with pytest.raises(WeightsError) as e:
        resolve_weights(f"{server.url}/w.npz", "x", cache_dir=tmp_path)
    assert "run again to resume" in str(e.value) and "\n" not in str(e.value)
    part = tmp_path / "weights" / "w.npz.part"
    assert part.stat().st_size == dl.CHUNK + 10 and not (tmp_path / "weights" / "w.npz").exists()
    server.cut_after = None
    assert resolve_weights(f"{server.url}/w.npz", "x", cache_dir=tmp_path).read_bytes() == PAYLOAD
    assert server.requests[-1][1] == f"bytes={dl.CHUNK + 10}-"


def test_offline_message_says_what_to_download_and_where(tmp_path, monkeypatch):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens here: connection refused, as offline
    monkeypatch.setattr(dl, "OFFICIAL_URL", f"http://127.0.0.1:{port}/bit_models/{{}}.npz")
    with pytest.raises(WeightsError) as e:
        resolve_weights("auto", "BiT-S-R50x1", cache_dir=tmp_path)
    msg = str(e.value)
    assert f"cannot download http://127.0.0.1:{port}/bit_models/BiT-S-R50x1.npz" in msg
    assert f"put it at {tmp_path / 'weights' / 'BiT-S-R50x1.npz'}" in msg and "\n" not in msg


def test_missing_remote_file_is_a_404_message(server, tmp_path):
    with pytest.raises(WeightsError, match="does not exist \\(HTTP 404\\)"):
        resolve_weights(f"{server.url}/nothing.bin", "x", cache_dir=tmp_path)


def test_local_paths_and_bad_specs(tmp_path):
    local = tmp_path / "mine.npz"
    local.write_bytes(b"x")
    assert resolve_weights(str(local), "BiT-M-R50x1") == local
    with pytest.raises(WeightsError, match="not found"):
        resolve_weights(str(tmp_path / "missing.npz"), "BiT-M-R50x1")
    with pytest.raises(WeightsError, match="no published weights for 'BiT-custom'"):
        resolve_weights("auto", "BiT-custom", cache_dir=tmp_path)


def test_hf_spec_offline_message(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsError) as e:
        resolve_weights("hf:google/bit-50", "BiT-M-R50x1", cache_dir=tmp_path)
    msg = str(e.value)
    assert f"cannot fetch config.json of hf:google/bit-50 (not in the cache {tmp_path / 'hf'} and HF_HUB_OFFLINE=1 is set)" in msg
    assert "https://huggingface.co/google/bit-50" in msg and "\n" not in msg


def test_hf_spec_without_network_fails_fast_offline(tmp_path):
    """No monkeypatching: on a machine without network the hub check switches to offline at once."""
    from bit_transfer.system import hub

    if hub.reachable(hub.endpoint()):
        pytest.skip("the hub is reachable here")
    code = (
        "import time; t = time.time()\n"
        "from bit_transfer.models import resolve_weights\n"
        "try:\n"
        f"    resolve_weights('hf:google/bit-50', 'BiT-M-R50x1', cache_dir={str(tmp_path)!r})\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, round(time.time() - t, 1), e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    name, seconds, msg = out.stdout.strip().split(" ", 2)
    assert name == "WeightsError" and float(seconds) < 10, out.stdout + out.stderr  # retries take 30 s+
    assert f"not in the cache {tmp_path / 'hf'} and {hub.host()} cannot be reached, so it ran with HF_HUB_OFFLINE=1" in msg
    assert "Retrying" not in out.stderr


def test_load_weights_resolves_remote_specs(server, home, monkeypatch):
    """load_weights('auto') goes through the cache (a home of its own): here the served bytes are not an npz."""
    from bit_transfer.models import create_model, load_weights

    monkeypatch.setattr(dl, "OFFICIAL_URL", server.url + "/{}.npz")
    model = create_model("BiT-M-R50x1", 2, depths=[1, 1, 1, 1], width=0.25)
    with pytest.raises(WeightsError, match="BiT-M-R50x1.npz is not a readable .npz.*download it again"):
        load_weights(model, "auto")
