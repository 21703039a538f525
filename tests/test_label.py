"""``lmgym label`` without a browser: the rankings store, the queue, the HTTP API (concurrency, hostile bodies)
and the rankings file feeding ``lmgym reward-model train`` unchanged."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

from lmgym import cli
from lmgym.label import (AlreadyRanked, LabelItem, LabelQueue, RankingStore, UnknownItem, check_tiers, item_id,
                         ranking_record, read_candidates, sample_candidates)
from lmgym.rewards.reward_model import read_preferences

HOSTILE = "<script>window.__pwned = 1</script><img src=x onerror=\"window.__pwned = 2\">"


def make_items(n=10, k=4):
    return [LabelItem(item_id(f"prompt {i}", [f"c{i}-{j}" for j in range(k)]), f"prompt {i}",
                      tuple(f"c{i}-{j}" for j in range(k))) for i in range(n)]


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------- records and the store
def test_ranking_record_gives_the_pairs_training_reads():
    item = LabelItem("x", "p", ("a", "b", "c"))
    strict = ranking_record(item, [[2], [0], [1]], "ada")
    assert strict["ranking"] == [2, 0, 1] and strict["labeller"] == "ada" and strict["labelled_at"].endswith("+00:00")
    # Best first c > a > b: every pair written out by hand.
    assert read_preferences([strict])[0].pairs == [("c", "a"), ("c", "b"), ("a", "b")]
    tied = ranking_record(item, [[1], [0, 2]], "ada")
    assert "ranking" not in tied and tied["tiers"] == [[1], [0, 2]]
    # b beats a and c; the tie between a and c makes no pair.
    assert sorted(read_preferences([tied])[0].pairs) == [("b", "a"), ("b", "c")]


@pytest.mark.parametrize("tiers", [[], [[0], [1]], [[0], [1], [1], [2]], [[0, 1, 2, 3]], [[0], [], [1, 2]],
                                   [[True], [0], [1]], [[0.0], [1], [2]], [["0"], [1], [2]], [0, 1, 2], "012",
                                   [[0], [1], [3]], [[-1], [0], [1]], None])
def test_tiers_that_are_not_a_permutation_are_refused(tiers):
    with pytest.raises(ValueError):
        check_tiers(tiers, 3)


def test_store_resumes_and_refuses_a_second_ranking(tmp_path):
    items, path = make_items(3), tmp_path / "r.jsonl"
    with RankingStore(path) as store:
        assert store.append(ranking_record(items[0], [[0], [1], [2], [3]], "a"))
        assert not store.append(ranking_record(items[0], [[3], [2], [1], [0]], "b"))
    with RankingStore(path) as store:
        assert store.ranked_ids() == {items[0].id}
        assert store.append(ranking_record(items[1], [[1], [0], [2], [3]], "a"))
    assert [r["id"] for r in lines(path)] == [items[0].id, items[1].id]
    assert lines(path)[0]["ranking"] == [0, 1, 2, 3]


def test_store_drops_a_torn_last_line_and_keeps_a_complete_one(tmp_path):
    items, path = make_items(3), tmp_path / "r.jsonl"
    good = json.dumps(ranking_record(items[0], [[0], [1], [2], [3]], "a"))
    path.write_text(good + "\n" + good[: len(good) // 2])  # a write cut off mid-line
    with pytest.warns(UserWarning, match="incomplete last line"):
        store = RankingStore(path)
    assert store.append(ranking_record(items[1], [[0], [1], [2], [3]], "a"))
    store.close()
    assert [r["id"] for r in lines(path)] == [items[0].id, items[1].id]
    path.write_text(good)  # complete but without its newline (edited by hand): kept, and the next line is separate
    with RankingStore(path) as store:
        assert store.append(ranking_record(items[2], [[0], [1], [2], [3]], "a"))
    assert [r["id"] for r in lines(path)] == [items[0].id, items[2].id]


def killed_writer_trials(store_class, folder, trials=30):
    """Fork writers that add long records (each spans many pages) and SIGKILL each one mid-stream."""
    rng = random.Random(0)
    for trial in range(trials):
        path = folder / f"r{trial}.jsonl"
        pid = os.fork()
        if pid == 0:  # the child: write until killed
            try:
                store = store_class(path)
                for i in range(10 ** 6):
                    size = 100_000 + 7919 * 97 * (i + trial) % 1_900_000
                    store.append({"id": f"x{i}", "prompt": "p", "completions": ["a" * size, "b"], "ranking": [0, 1]})
            finally:
                os._exit(0)
        target = rng.randrange(1_000_000, 6_000_000)
        deadline = time.monotonic() + 20
        while (not path.exists() or path.stat().st_size < target) and time.monotonic() < deadline:
            time.sleep(0.0005)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert path.read_bytes().endswith(b"\n"), f"trial {trial}: the file ends in half a line"
        ids = [r["id"] for r in lines(path)]
        assert ids == [f"x{i}" for i in range(len(ids))]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_killed_writer_never_leaves_half_a_line(tmp_path):
    killed_writer_trials(RankingStore, tmp_path)
    path = tmp_path / "r0.jsonl"
    with RankingStore(path) as store:  # it opens without repairs, with every record there
        assert len(store.ranked_ids()) == len(lines(path))
    assert not list(tmp_path.glob(".r0.jsonl.*.tmp"))  # and a killed writer's temporary file is cleaned up


def test_two_stores_on_one_file_never_duplicate(tmp_path):
    """Two server processes on one rankings file: the file lock and the catch-up read keep one record per item."""
    items, path = make_items(40), tmp_path / "r.jsonl"
    stores = [RankingStore(path), RankingStore(path)]
    saved = []

    def worker(n):
        order = list(items)
        random.Random(n).shuffle(order)
        for item in order:
            if stores[n % 2].append(ranking_record(item, [[0], [1], [2], [3]], f"w{n}")):
                saved.append(item.id)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for s in stores:
        s.close()
    ids = [r["id"] for r in lines(path)]
    assert sorted(ids) == sorted(i.id for i in items) and sorted(saved) == sorted(ids)


# ----------------------------------------------------------------------------- items
def test_read_candidates_names_the_bad_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"prompt": "p", "completions": ["a", "b"]}) + "\n"
                    + json.dumps({"prompt": "q", "completions": ["a", " "]}) + "\n")
    with pytest.raises(ValueError, match="line 2: an empty completion"):
        read_candidates(path)
    path.write_text(json.dumps({"prompt": "p", "completions": ["a"]}) + "\n")
    with pytest.raises(ValueError, match="line 1: 1 completions"):
        read_candidates(path)
    path.write_text("{\n")
    with pytest.raises(ValueError, match="line 1: not valid JSON"):
        read_candidates(path)
    row = {"prompt": "p", "completions": ["a", "b"]}
    path.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n" + json.dumps({**row, "prompt": "q"}) + "\n")
    items = read_candidates(path)  # an exact repeat is ranked once
    assert [i.prompt for i in items] == ["p", "q"] and items[0].id == item_id("p", ["a", "b"])


def test_sampled_candidates_are_seeded(tiny):
    model, tok = tiny
    prompts = ["the cat", "the dog ran"]
    first = sample_candidates(model, tok, prompts, 4, max_new_tokens=6, seed=3)
    again = sample_candidates(model, tok, prompts, 4, max_new_tokens=6, seed=3)
    other = sample_candidates(model, tok, prompts, 4, max_new_tokens=6, seed=4)
    assert first == again and [i.id for i in first] != [i.id for i in other]
    for item in first:
        assert item.prompt in prompts and 2 <= len(item.completions) <= 4 and all(c.strip() for c in item.completions)
        assert item.id == item_id(item.prompt, item.completions)
    with pytest.raises(ValueError, match="between 2 and 9"):
        sample_candidates(model, tok, prompts, 1)


# ----------------------------------------------------------------------------- the queue
def test_queue_leases_items_per_session_and_resumes(tmp_path):
    items, path = make_items(4), tmp_path / "r.jsonl"
    now = [0.0]
    queue = LabelQueue(items, RankingStore(path), lease_seconds=60, clock=lambda: now[0])
    a, _, _ = queue.next_for("tab-a-000")
    b, _, _ = queue.next_for("tab-b-000")
    assert (a.id, b.id) == (items[0].id, items[1].id)
    assert queue.next_for("tab-a-000")[0] == a  # a reload shows the same prompt
    queue.skip("tab-a-000", a.id)
    assert queue.next_for("tab-a-000")[0] == items[2]
    assert queue.next_for("tab-c-000")[0] == items[0]  # a skipped item is free for others
    queue.submit("tab-b-000", b.id, [[0], [1], [2], [3]], "bo")
    with pytest.raises(AlreadyRanked):
        queue.submit("tab-a-000", b.id, [[0], [1], [2], [3]], "al")
    with pytest.raises(UnknownItem):
        queue.submit("tab-a-000", "nope", [[0], [1], [2], [3]], "al")
    now[0] = 61.0  # leases ran out: the first free item goes to whoever asks
    assert queue.next_for("tab-d-000")[0] == items[0]
    queue.store.close()
    resumed = LabelQueue(items, RankingStore(path))
    assert resumed.progress() == {"ranked": 1, "total": 4}
    assert [resumed.next_for(f"s{n}-000000")[0].id for n in range(3)] == [items[0].id, items[2].id, items[3].id]


# ----------------------------------------------------------------------------- the HTTP API
@contextmanager
def running_server(queue, token=None):
    """The app under uvicorn in a thread, on a free loopback port; stopped (bounded) on exit."""
    pytest.importorskip("starlette", reason="the label extra is not installed: pip install -e '.[label]'")
    uvicorn = pytest.importorskip("uvicorn", reason="the label extra is not installed: pip install -e '.[label]'")
    from lmgym.label.server import bind_socket, create_app

    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(queue, token=token), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def call(method, url, body=None, headers=None, raw: bytes | None = None):
    """(status, JSON body or text) of one request, with a timeout."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = {"Content-Type": "application/json"} if data is not None else {}
    request = urllib.request.Request(url, data=data, method=method, headers={**hdrs, **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def test_concurrent_submissions_keep_one_record_per_item(tmp_path):
    items, path = make_items(10), tmp_path / "r.jsonl"
    queue = LabelQueue(items, RankingStore(path))
    with running_server(queue) as url:
        def client(n):
            order = list(items)
            random.Random(n).shuffle(order)
            return [call("POST", f"{url}/api/rankings", {"session": f"client-{n:04d}", "id": item.id,
                                                          "tiers": [[3], [2], [1], [0]], "labeller": f"c{n}"})[0]
                    for item in order]

        with ThreadPoolExecutor(max_workers=6) as pool:
            statuses = [s for result in pool.map(client, range(6), timeout=60) for s in result]
        progress = call("GET", f"{url}/api/next?session=client-0000")[1]
    assert statuses.count(201) == 10 and statuses.count(409) == 50
    records = lines(path)
    assert sorted(r["id"] for r in records) == sorted(i.id for i in items)
    assert all(r["ranking"] == [3, 2, 1, 0] for r in records)
    assert progress["progress"] == {"ranked": 10, "total": 10} and progress["item"] is None


def test_hostile_and_malformed_requests_get_clear_4xx_and_write_nothing(tmp_path):
    items = make_items(2)
    items[0] = LabelItem(item_id("p", [HOSTILE, "fine"]), "<b>p</b>", (HOSTILE, "fine"))
    path = tmp_path / "r.jsonl"
    queue = LabelQueue(items, RankingStore(path))
    good = {"session": "session-01", "id": items[0].id, "tiers": [[1], [0]], "labeller": "ada"}
    with running_server(queue) as url:
        post = f"{url}/api/rankings"
        status, shown = call("GET", f"{url}/api/next?session=session-01")
        assert status == 200 and shown["item"]["completions"][0] == HOSTILE  # returned as data, verbatim
        cases = [
            (400, dict(raw=b"{not json")),
            (400, dict(raw=b"\xff\xfe")),
            (400, dict(raw=b"[" * 5000 + b"]" * 5000)),
            (400, dict(body=[good])),
            (400, dict(body={**good, "admin": True})),
            (400, dict(body={k: v for k, v in good.items() if k != "tiers"})),
            (400, dict(body={**good, "session": "x"})),
            (400, dict(body={**good, "session": "../../etc/passwd"})),
            (400, dict(body={**good, "id": 5})),
            (404, dict(body={**good, "id": "no-such-item"})),
            (422, dict(body={**good, "tiers": [[0], [0]]})),
            (422, dict(body={**good, "tiers": [[0]]})),
            (422, dict(body={**good, "tiers": [[0], [1], [2]]})),
            (422, dict(body={**good, "tiers": [[True], [0]]})),
            (422, dict(body={**good, "tiers": "10"})),
            (422, dict(body={**good, "labeller": ""})),
            (422, dict(body={**good, "labeller": "a\nb"})),
            (422, dict(body={**good, "labeller": "x" * 101})),
            (422, dict(body={**good, "labeller": 7})),
            (413, dict(body={**good, "labeller": "x" * 20_000})),
            (415, dict(raw=json.dumps(good).encode(), headers={"Content-Type": "text/plain"})),
            (421, dict(body=good, headers={"Host": "evil.example:80"})),
        ]
        for expected, kwargs in cases:
            status, answer = call("POST", post, **kwargs)
            assert status == expected, (kwargs, status, answer)
            assert isinstance(answer, dict) and answer["error"], answer
        assert call("GET", f"{url}/api/next?session=bad")[0] == 400
        assert call("POST", f"{url}/api/skip", {"session": "session-01", "id": "nope"})[0] == 404
        assert path.read_bytes() == b""  # nothing written by any of them
        assert call("POST", post, good)[0] == 201
        status, page = call("GET", url + "/")
    assert status == 200 and HOSTILE not in page and "innerHTML" not in page  # the page holds no data, writes text
    record = lines(path)[0]
    assert record["completions"][0] == HOSTILE and record["ranking"] == [1, 0]


def test_the_page_forbids_inline_and_foreign_scripts(tmp_path):
    pytest.importorskip("starlette", reason="the label extra is not installed: pip install -e '.[label]'")
    queue = LabelQueue(make_items(1), RankingStore(tmp_path / "r.jsonl"))
    with running_server(queue) as url:
        with urllib.request.urlopen(url + "/", timeout=10) as response:
            csp, page = response.headers["Content-Security-Policy"], response.read().decode()
    nonce = csp.split("'nonce-")[1].split("'")[0]
    assert "default-src 'none'" in csp and f"script-src 'nonce-{nonce}'" in csp and "unsafe-inline" not in csp
    assert page.count(f'nonce="{nonce}"') == 2 and "{{nonce}}" not in page
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in page


def test_a_token_guards_the_api(tmp_path):
    path = tmp_path / "r.jsonl"
    items = make_items(1)
    queue = LabelQueue(items, RankingStore(path))
    body = {"session": "session-01", "id": items[0].id, "tiers": [[0], [1], [2], [3]], "labeller": "ada"}
    with running_server(queue, token="s3cret") as url:
        assert call("GET", f"{url}/api/next?session=session-01")[0] == 401
        assert call("POST", f"{url}/api/rankings", body, headers={"X-Lmgym-Token": "wrong"})[0] == 401
        assert path.read_bytes() == b""
        assert call("GET", url + "/")[0] == 200  # the page itself holds nothing secret
        assert call("POST", f"{url}/api/rankings", body, headers={"X-Lmgym-Token": "s3cret"})[0] == 201


def test_cli_refuses_an_exposed_server_without_a_token(tmp_path, capsys):
    cands = tmp_path / "c.jsonl"
    cands.write_text(json.dumps({"prompt": "p", "completions": ["a", "b"]}) + "\n")
    assert cli.main(["label", "--candidates", str(cands), "--out", str(tmp_path / "r.jsonl"),
                     "--host", "0.0.0.0"]) == 2
    assert "--token" in capsys.readouterr().err
    assert cli.main(["label", "--candidates", str(cands), "--model", "m", "--out", str(tmp_path / "r.jsonl")]) == 2
    assert "either --candidates" in capsys.readouterr().err
    assert cli.main(["label", "--candidates", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "r.jsonl")]) == 2
    assert "none.jsonl does not exist" in capsys.readouterr().err


def test_rankings_file_trains_a_reward_model_with_the_cli(tiny, tmp_path):
    model, tok = tiny
    backbone = tmp_path / "lm"
    model.save_pretrained(backbone)
    tok.save_pretrained(backbone)
    items = [LabelItem(item_id(p, c), p, c) for p, c in [
        ("the cat", ("good day", "bad day", "very good")), ("the dog", ("ran far", "sat on mat", "good")),
        ("a", ("very bad", "good good", "the mat"))]]
    path = tmp_path / "r.jsonl"
    with RankingStore(path) as store:
        store.append(ranking_record(items[0], [[2], [0], [1]], "ada"))
        store.append(ranking_record(items[1], [[2], [0, 1]], "bo"))
        store.append(ranking_record(items[2], [[1], [2], [0]], "ada"))
    groups = read_preferences(path)
    assert [len(g.pairs) for g in groups] == [3, 2, 3]
    out = tmp_path / "rm"
    assert cli.main(["reward-model", "train", "--data", str(path), "--backbone", str(backbone), "--out", str(out),
                     "--eval-data", str(path), "--epochs", "2", "--learning-rate", "1e-2"]) == 0
    metrics = json.loads((out / "training_metrics.json").read_text())
    assert metrics["steps"] == 2 and 0.0 <= metrics["eval_accuracy"] <= 1.0


def test_reward_model_training_from_the_cli_is_reproducible(tiny, tmp_path):
    """The same rankings and --seed give the same reward model (the head's initialisation is seeded too)."""
    model, tok = tiny
    backbone = tmp_path / "lm"
    model.save_pretrained(backbone)
    tok.save_pretrained(backbone)
    path = tmp_path / "r.jsonl"
    with RankingStore(path) as store:
        for p, c in [("the cat", ("good day", "bad day", "very good")),
                     ("the dog", ("ran far", "sat on mat", "good"))]:
            store.append(ranking_record(LabelItem(item_id(p, c), p, c), [[2], [0], [1]], "ada"))
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert cli.main(["reward-model", "train", "--data", str(path), "--backbone", str(backbone), "--out", str(out),
                         "--epochs", "2", "--learning-rate", "1e-2", "--seed", "3"]) == 0
        runs.append(json.loads((out / "training_metrics.json").read_text()))
    assert runs[0] == runs[1]


def test_cli_samples_candidates_from_a_model_and_resumes(tiny, tmp_path, monkeypatch, capsys):
    pytest.importorskip("starlette", reason="the label extra is not installed: pip install -e '.[label]'")
    pytest.importorskip("uvicorn", reason="the label extra is not installed: pip install -e '.[label]'")
    from lmgym.label import server

    model, tok = tiny
    folder = tmp_path / "lm"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\nthe dog ran\n\nvery good day\n")
    served = []
    monkeypatch.setattr(server, "serve", lambda app, sock: served.append(sock.getsockname()))  # don't block
    args = ["label", "--model", str(folder), "--prompts", str(prompts), "-k", "3", "--max-new-tokens", "5",
            "--seed", "7", "--device", "cpu", "--out", str(tmp_path / "r.jsonl"), "--port", "0"]
    assert cli.main(args) == 0
    first = capsys.readouterr().out
    assert "0 already ranked" in first and f"http://127.0.0.1:{served[0][1]}/" in first
    items = sample_candidates(*tiny, ["the cat", "the dog ran", "very good day"], 3, max_new_tokens=5, seed=7)
    assert f"{len(items)} prompts" in first
    with RankingStore(tmp_path / "r.jsonl") as store:  # someone ranks the first; a restart skips it
        store.append(ranking_record(items[0], [[i] for i in range(len(items[0].completions))], "ada"))
    assert cli.main(args) == 0
    assert f"{len(items)} prompts, 1 already ranked" in capsys.readouterr().out


def test_prompt_file_errors_name_the_line_in_the_file(tmp_path):
    """Blank lines count: the error points at the line an editor shows (lmgym.utils.jsonl)."""
    from lmgym.label import read_prompts

    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a"}\n\n{"prompt": 3}\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl, line 3: expected an object with a string 'prompt'"):
        read_prompts(path)
