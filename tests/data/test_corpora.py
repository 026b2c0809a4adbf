"""Corpora: the embedded standard-library corpus, the Tiny Shakespeare download, local files."""
from __future__ import annotations

import hashlib
import http.server
import socket
import threading
from pathlib import Path

import pytest

from tfd_jax.data import corpora
from tfd_jax.data.corpora import load_corpus


# --- pystdlib --------------------------------------------------------------------------------

def test_pystdlib_loads_is_deterministic_and_splits_disjointly():
    train = load_corpus("pystdlib")
    val = load_corpus("pystdlib", split="val")
    assert len(train) > 100 and len(val) >= 1
    assert train.num_chars > 1_000_000
    train_names = [d.name for d in train.documents]
    val_names = [d.name for d in val.documents]
    assert not set(train_names) & set(val_names)
    assert train_names == sorted(train_names)
    assert "os.py" in train_names + val_names
    again = load_corpus("pystdlib", split="val")
    assert again.documents == val.documents
    for name in train_names + val_names:
        parts = name.split("/")
        assert not parts[-1].startswith("test_"), name
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts[:-1]), name


def test_pystdlib_excludes_tests_packages_and_non_utf8(tmp_path):
    files = {
        "os.py": "import sys\n",
        "json/__init__.py": "# json\n",
        "json/decoder.py": "# decoder\n",
        "email/mime/text.py": "# mime\n",
        "test/support.py": "# a test helper\n",
        "unittest/test/test_case.py": "# test\n",
        "lib2to3/tests/data.py": "# test data\n",
        "idlelib/idle_test/htest.py": "# idle test\n",
        "test_grammar.py": "# top-level test\n",
        "site-packages/numpy/core.py": "# installed package\n",
        "notes.txt": "not python\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / "latin.py").write_bytes(b"# caf\xe9\n")
    docs = corpora.pystdlib("train", root=tmp_path, val_fraction=0.2) + corpora.pystdlib(
        "val", root=tmp_path, val_fraction=0.2)
    assert sorted(d.name for d in docs) == ["email/mime/text.py", "json/__init__.py", "json/decoder.py", "os.py"]
    val = corpora.pystdlib("val", root=tmp_path, val_fraction=0.2)
    assert len(val) == 1  # ceil(4 * 0.2)


def test_max_bytes_keeps_a_prefix_of_whole_documents():
    full = load_corpus("pystdlib")
    small = load_corpus("pystdlib", max_bytes=50_000)
    assert len(small.text.encode()) <= 50_000 + len(small) - 1  # the joining newlines
    n = len(small)
    assert [d.name for d in small.documents] == [d.name for d in full.documents[:n]]
    assert small.documents[: n - 1] == full.documents[: n - 1]
    assert full.documents[n - 1].text.startswith(small.documents[-1].text)
    with pytest.raises(ValueError, match="max_bytes must be positive"):
        load_corpus("pystdlib", max_bytes=0)


# --- tinyshakespeare with a local server ----------------------------------------------------

class _Server:
    def __init__(self, body: bytes):
        self.body, self.hits = body, 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.hits += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/input.txt"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


FAKE = ("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20).encode()
FAKE_MD5 = hashlib.md5(FAKE).hexdigest()


@pytest.fixture
def server():
    s = _Server(FAKE)
    yield s
    s.close()


def test_download_checks_md5_caches_and_splits_90_10(server, tmp_path):
    train = corpora.tinyshakespeare("train", url=server.url, md5=FAKE_MD5, cache_dir=tmp_path)
    assert server.hits == 1
    cached = tmp_path / corpora.TINYSHAKESPEARE_FILE
    assert cached.read_bytes() == FAKE
    assert [p.name for p in tmp_path.iterdir()] == [corpora.TINYSHAKESPEARE_FILE]  # no temp files
    val = corpora.tinyshakespeare("val", url=server.url, md5=FAKE_MD5, cache_dir=tmp_path)
    assert server.hits == 1  # served from the cache
    text = FAKE.decode()
    cut = int(len(text) * 0.9)
    assert train[0].text == text[:cut] and val[0].text == text[cut:]


def test_checksum_mismatch_names_both_md5s_and_caches_nothing(server, tmp_path):
    expected = "0" * 32
    with pytest.raises(ValueError, match=f"expected md5 {expected}, got {FAKE_MD5}"):
        corpora.tinyshakespeare(url=server.url, md5=expected, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_cache_is_downloaded_again(server, tmp_path):
    (tmp_path / corpora.TINYSHAKESPEARE_FILE).write_bytes(b"half a fi")
    docs = corpora.tinyshakespeare("train", url=server.url, md5=FAKE_MD5, cache_dir=tmp_path)
    assert server.hits == 1 and docs[0].text.startswith("First Citizen")
    assert (tmp_path / corpora.TINYSHAKESPEARE_FILE).read_bytes() == FAKE


def test_load_corpus_uses_env_url_and_data_dir(server, tmp_path, monkeypatch):
    monkeypatch.setenv("TFD_TINYSHAKESPEARE_URL", server.url)
    monkeypatch.setenv("TFD_DATA_DIR", str(tmp_path))
    # the real checksum does not match the fake file: the error proves the env URL was used
    with pytest.raises(ValueError, match=f"checksum mismatch for {server.url}"):
        load_corpus("tinyshakespeare")
    assert server.hits == 1
    assert list(tmp_path.iterdir()) == []  # nothing cached in TFD_DATA_DIR after a bad download


def test_unreachable_server_gives_a_clear_error(tmp_path):
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ValueError, match="could not download tinyshakespeare"):
        corpora.tinyshakespeare(url=f"http://127.0.0.1:{port}/x", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_tinyshakespeare_from_a_local_path(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text("abcdefghij" * 10)
    assert corpora.tinyshakespeare("val", path=path)[0].text == ("abcdefghij" * 10)[90:]


# --- local files ----------------------------------------------------------------------------

def _tree(root: Path) -> None:
    for i in range(12):
        (root / f"sub{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"sub{i % 3}" / f"doc{i:02d}.txt").write_text(f"document {i}\n")
    (root / "readme.md").write_text("# readme\n")
    (root / "image.png").write_bytes(b"\x89PNG\xff\xfe")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD.txt").write_text("ref\n")


def test_directory_corpus_is_sorted_recursive_and_split_by_document(tmp_path):
    _tree(tmp_path)
    train = load_corpus(str(tmp_path))
    val = load_corpus(str(tmp_path), split="val")
    names = sorted([d.name for d in train.documents] + [d.name for d in val.documents])
    assert names == sorted(["readme.md"] + [f"sub{i % 3}/doc{i:02d}.txt" for i in range(12)])
    assert [d.name for d in train.documents] == sorted(d.name for d in train.documents)
    assert len(val) == 2  # ceil(13 * 0.1)
    assert train.text == "\n".join(d.text for d in train.documents)


def test_glob_and_single_file(tmp_path):
    _tree(tmp_path)
    both = load_corpus(str(tmp_path / "sub1" / "*.txt")).documents + load_corpus(
        str(tmp_path / "sub1" / "*.txt"), split="val").documents
    assert sorted(Path(d.name).name for d in both) == ["doc01.txt", "doc04.txt", "doc07.txt", "doc10.txt"]
    one = tmp_path / "one.txt"
    one.write_text("0123456789" * 3)
    assert load_corpus(str(one)).text == ("0123456789" * 3)[:27]
    assert load_corpus(str(one), split="val").text == ("0123456789" * 3)[27:]


def test_missing_paths_and_empty_globs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        load_corpus(str(tmp_path / "nope.txt"))
    with pytest.raises(FileNotFoundError, match="matches no files"):
        load_corpus(str(tmp_path / "*.nothing"))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="holds no text files"):
        load_corpus(str(tmp_path / "empty_dir"))


def test_non_utf8_file_names_file_and_offset(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"hello caf\xe9\n")
    with pytest.raises(ValueError, match=r"latin1\.txt is not valid UTF-8 \(byte 0xe9 at offset 9\)"):
        load_corpus(str(bad))
    (tmp_path / "good.txt").write_text("fine\n")
    with pytest.raises(ValueError, match="latin1.txt is not valid UTF-8"):
        load_corpus(str(tmp_path))


def test_empty_corpus_and_bad_split(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="is empty; give it more text"):
        load_corpus(str(empty))
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        load_corpus("pystdlib", split="test")
