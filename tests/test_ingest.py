"""WebSocket ingest with the real websockets client: handshake, audio, bad senders, isolation."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import urllib.request
import wave

import av
import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from musetalk_rt.cli import main
from musetalk_rt.errors import UserError
from musetalk_rt.live.ingest import IngestConfig, IngestServer, RecordingSink
from musetalk_rt.live.protocol import tokens_match
from musetalk_rt.live.send import send_clip
from musetalk_rt.media import AudioClip, load_audio
from musetalk_rt.testing.senders import send_oversized

TOKEN = "s3cret-token"


def _clip(seconds=2.0, rate=16000, channels=1, seed=0):
    x = np.random.default_rng(seed).standard_normal((channels, int(seconds * rate))) * 0.1
    x = np.rint(np.clip(x, -1, 1) * 32767) / 32767
    return AudioClip(x.astype(np.float32), rate)


def _hello(**over):
    h = {
        "type": "hello",
        "token": TOKEN,
        "format": "pcm_s16le",
        "sample_rate": 16000,
        "channels": 1,
    }
    h.update(over)
    return json.dumps(h)


async def _refusal(url, first, then=None):
    """Send ``first`` (and ``then``); return (error message dict, close code)."""
    async with connect(url, max_size=2**24) as ws:
        msgs = []
        try:
            await ws.send(first)
            if then is not None:
                await ws.send(then)
        except ConnectionClosed:  # refused before it finished sending
            pass
        msgs += await _drain(ws)
        errors = [m for m in msgs if m.get("type") == "error"]
        return (errors[0] if errors else None), ws.close_code


async def _drain(ws) -> list[dict]:
    """Messages until the server closes (any close code)."""
    msgs = []
    try:
        async for m in ws:
            msgs.append(json.loads(m))
    except ConnectionClosed:
        pass
    return msgs


def _serve(coro_fn, **cfg):
    sinks = {"a": RecordingSink(), "b": RecordingSink()}

    async def run():
        config = IngestConfig(port=0, token=TOKEN, **cfg)
        async with IngestServer(sinks, config) as srv:
            return await coro_fn(srv, sinks, f"ws://127.0.0.1:{srv.port}/ingest/")

    return asyncio.run(run()), sinks


def test_token_compare_is_exact():
    assert tokens_match("abc", "abc") and not tokens_match("abd", "abc")
    assert not tokens_match(None, "abc") and not tokens_match(123, "abc")
    assert tokens_match(None, None)


def test_sender_audio_arrives_exactly_and_stats_come_back():
    clip = _clip(2.5, rate=48000, channels=2)

    async def go(srv, sinks, base):
        return await send_clip(base + "a", clip, TOKEN, chunk_ms=20, realtime=True)

    rep, sinks = _serve(go, stats_interval_s=0.5)
    assert rep.chunks == 125 and rep.close_code == 1000
    assert rep.stats and rep.stats[-1]["received_s"] > 1.0  # stats every interval
    expected = clip.to_mono_16k()
    got = sinks["a"].audio
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=2e-4)  # int16 on the wire
    assert sinks["b"].audio.size == 0 and not sinks["a"].open


def test_ingest_declines_compression():
    # the client offers permessage-deflate (websockets' default, and browsers'); the ingest
    # declines it: inflating PCM on the event loop costs more than the bytes it saves
    async def go(srv, sinks, base):
        async with connect(base + "a") as ws:
            await ws.send(_hello())
            ready = json.loads(await ws.recv())
            return ready, ws.protocol.extensions

    (ready, extensions), _ = _serve(go)
    assert ready["type"] == "ready" and extensions == []


def test_a_sender_arriving_while_the_last_one_leaves_gets_the_channel():
    # a reconnecting sender can say hello before the server has let its old connection go:
    # it waits for the channel (up to busy_grace_s) instead of being refused as a second one
    async def go(srv, sinks, base):
        async with connect(base + "a") as first:
            await first.send(_hello())
            assert json.loads(await first.recv())["type"] == "ready"
            second = await connect(base + "a")
            await second.send(_hello())
            await asyncio.sleep(0.2)  # the second hello waits while the first still holds it
        reply = json.loads(await second.recv())  # the first has left
        await second.close()
        return reply

    reply, _ = _serve(go, busy_grace_s=5.0)
    assert reply["type"] == "ready" and reply["channel"] == "a"


def test_bad_senders_get_one_clear_refusal_each():
    async def go(srv, sinks, base):
        out = {}
        out["wrong token"] = await _refusal(base + "a", _hello(token="nope"))
        out["no token"] = await _refusal(base + "a", _hello(token=None))
        out["malformed hello"] = await _refusal(base + "a", "{hello")
        out["missing hello"] = await _refusal(base + "a", b"\x00\x01" * 100)
        out["unknown format"] = await _refusal(base + "a", _hello(format="mp3"))
        out["200 kHz"] = await _refusal(base + "a", _hello(sample_rate=200000))
        out["3 channels"] = await _refusal(base + "a", _hello(channels=3))
        out["1.0 channels"] = await _refusal(base + "a", _hello(channels=1.0))
        out["nested hello"] = await _refusal(base + "a", "[" * 100_000 + "]" * 100_000)
        out["bad sender id"] = await _refusal(base + "a", _hello(sender="a b/../c"))
        out["unknown channel"] = await _refusal(base + "zzz", _hello())
        out["torn pcm"] = await _refusal(base + "a", _hello(channels=2), b"\x00\x01\x02")
        out["opus garbage"] = await _refusal(
            base + "a", _hello(format="opus", sample_rate=48000), b"\xff" * 7
        )
        out["10 MB message"] = (None, await asyncio.to_thread(send_oversized, base + "a", _hello()))
        out["lone surrogate token"] = await _refusal(base + "a", _hello(token="\ud800"))
        # quoted back in the error, cut: a close reason holds at most 123 bytes
        out["long CJK format"] = await _refusal(base + "a", _hello(format="中" * 60))
        out["unknown control"] = await _refusal(base + "a", _hello(), '{"type": "pause"}')
        return out

    out, _ = _serve(go)
    expect = {
        "wrong token": 4401,
        "no token": 4401,
        "malformed hello": 4400,
        "missing hello": 4400,
        "unknown format": 4415,
        "200 kHz": 4415,
        "3 channels": 4415,
        "1.0 channels": 4415,
        "nested hello": 4400,
        "bad sender id": 4400,
        "unknown channel": 4404,
        "torn pcm": 4422,
        "opus garbage": 4422,
        "10 MB message": 1009,
        "lone surrogate token": 4401,
        "long CJK format": 4415,
        "unknown control": 4400,
    }
    for name, code in expect.items():
        err, close = out[name]
        assert close == code, (name, err, close)
        if code != 1009:
            assert err["code"] == code and len(err["message"]) > 10, name


def test_a_channel_named_in_chinese_is_found_through_its_encoded_path():
    clip = _clip(0.5, seed=5)

    async def run():
        sinks = {"主播": RecordingSink()}
        async with IngestServer(sinks, IngestConfig(port=0, token=TOKEN)) as srv:
            url = f"ws://127.0.0.1:{srv.port}/ingest/%E4%B8%BB%E6%92%AD"  # as a browser sends it
            rep = await send_clip(url, clip, TOKEN, realtime=False)
            return rep, sinks["主播"].audio.size

    rep, samples = asyncio.run(run())
    assert rep.close_code == 1000 and samples == 8000


def test_a_stream_is_read_while_it_is_sent_and_a_cancel_says_bye():
    """The microphone's path: an endless source, the server's stats read as they come (a client
    that stops reading is dropped by the server's pings), Ctrl-C ends with flush and bye."""
    from musetalk_rt.live.send import SendReport, _session

    async def mic_like():  # 20 ms blocks in real time, forever
        block = np.zeros(320, "<i2").tobytes()
        while True:
            await asyncio.sleep(0.02)
            yield block

    async def go(srv, sinks, base):
        seen = []
        task = asyncio.create_task(
            _session(base + "a", json.loads(_hello()), mic_like(), SendReport(), seen.append,
                     5.0, None, stop_on_cancel=True)
        )  # fmt: skip
        await asyncio.sleep(1.6)
        stats_while_sending = sum(m["type"] == "stats" for m in seen)
        task.cancel()
        report = await task  # the microphone's Ctrl-C: its normal end, with the report
        assert report.interrupted and report.chunks >= 50
        for _ in range(50):  # the server ends the session on bye
            if not sinks["a"].open:
                break
            await asyncio.sleep(0.02)
        return stats_while_sending, sinks["a"].open, srv.refused

    (stats, still_open, refused), sinks = _serve(go, stats_interval_s=0.25)
    assert stats >= 4 and not still_open and not refused
    assert 1.0 <= sinks["a"].audio.size / 16000 <= 1.7


def test_a_server_error_in_the_middle_of_a_send_is_the_senders_error():
    """The server stops a sender mid-stream (torn PCM): send_clip raises with its message,
    it does not end as a success."""
    from musetalk_rt.live.send import SendReport, _session

    async def torn():
        yield np.zeros(320, "<i2").tobytes()
        yield b"\x00\x01\x02"  # 1.5 samples of 16-bit mono
        await asyncio.sleep(5)  # a sender would go on; the server has closed
        yield b"\x00\x00"

    async def go(srv, sinks, base):
        with pytest.raises(UserError, match="stopped the sender") as err:
            await _session(base + "a", json.loads(_hello()), torn(), SendReport(), None, 5.0, None)
        return str(err.value)

    msg, _ = _serve(go)
    assert "whole" in msg or "sample" in msg or "bytes" in msg, msg


def test_hello_timeout():
    async def go(srv, sinks, base):
        async with connect(base + "a") as ws:
            return await _drain(ws), ws.close_code

    (msgs, code), _ = _serve(go, hello_timeout_s=0.3)
    assert code == 4408 and msgs[0]["code"] == 4408


def test_second_sender_refused_stalled_sender_harmless_other_channel_unaffected():
    clip = _clip(1.5, seed=3)

    async def go(srv, sinks, base):
        async with connect(base + "a") as first:  # connects, then stalls: sends nothing
            await first.send(_hello())
            assert json.loads(await first.recv())["type"] == "ready"
            second = await _refusal(base + "a", _hello())
            rep = await send_clip(base + "b", clip, TOKEN, realtime=False)
            assert sinks["a"].open  # the stalled sender still holds its channel
        return second, rep

    (second, rep), sinks = _serve(go)
    err, code = second
    assert code == 4409 and "already has a sender" in err["message"]
    np.testing.assert_allclose(sinks["b"].audio, clip.samples[0], atol=1e-4)
    assert sinks["a"].audio.size == 0


def test_a_sender_silent_past_the_limit_is_replaced_by_a_new_one():
    """A dropped network leaves the old connection open on the server until its pings time out
    (~40 s): a sender that has sent nothing for ``stale_sender_s`` gives way when the same
    sender (its ``sender`` id) connects again, and its audio then arrives as a new session. One
    still sending, another sender, or one without an id is refused as before."""
    clip = _clip(1.0, seed=4)

    async def go(srv, sinks, base):
        async with connect(base + "a") as old:
            await old.send(_hello(sender="tab-1"))
            assert json.loads(await old.recv())["type"] == "ready"
            await old.send(np.zeros(320, "<i2").tobytes())
            busy = await _refusal(base + "a", _hello(sender="tab-1"))  # sent just now: refused
            await asyncio.sleep(3.0)  # then nothing, past the limit
            other = await _refusal(base + "a", _hello(sender="tab-2"))  # not the same sender
            plain = await _refusal(base + "a", _hello())  # nor one without an id
            rep = await send_clip(base + "a", clip, TOKEN, realtime=False, sender="tab-1")
            with contextlib.suppress(ConnectionClosed):  # the old one was cut off
                while True:
                    await old.recv()
        return busy, other, plain, rep

    (busy, other, plain, rep), sinks = _serve(go, stale_sender_s=2.0)
    assert busy[1] == other[1] == plain[1] == 4409
    assert sinks["a"].sessions == 2
    assert sinks["a"].audio.size == 320 + clip.num_samples  # both senders' audio, in order
    np.testing.assert_allclose(sinks["a"].audio[320:], clip.samples[0], atol=1e-4)


def test_flooding_sender_is_paced_not_dropped():
    clip = _clip(3.0, seed=5)

    async def go(srv, sinks, base):
        return await send_clip(base + "a", clip, TOKEN, chunk_ms=100, realtime=False)

    rep, sinks = _serve(go, max_ahead_s=0.5, stats_interval_s=0.25)
    assert sinks["a"].audio.size == clip.num_samples  # nothing lost
    assert max(s["paced_s"] for s in rep.stats) > 0  # the server held the sender back
    assert max(s["ahead_s"] for s in rep.stats) <= 0.5 + 0.1 + 0.05  # one chunk of slack


def test_opus_sender():
    enc = av.CodecContext.create("libopus", "w")
    enc.sample_rate, enc.layout, enc.format, enc.bit_rate = 48000, "mono", "s16", 48000
    t = np.arange(48000) / 48000
    x = (np.sin(2 * np.pi * 300 * t) * 8000).astype(np.int16)
    packets = []
    for i in range(0, len(x), 960):
        fr = av.AudioFrame.from_ndarray(x[None, i : i + 960], format="s16", layout="mono")
        fr.sample_rate, fr.pts = 48000, i
        packets += [bytes(p) for p in enc.encode(fr)]

    async def go(srv, sinks, base):
        async with connect(base + "a") as ws:
            await ws.send(_hello(format="opus", sample_rate=48000))
            assert json.loads(await ws.recv())["type"] == "ready"
            for p in packets:
                await ws.send(p)
            await ws.send(json.dumps({"type": "bye"}))
            await _drain(ws)

    _, sinks = _serve(go)
    got = sinks["a"].audio
    assert abs(got.size - 16000) < 800  # one second at 16 kHz (codec delay aside)
    assert 0.15 < np.abs(got).max() < 0.35  # the tone's amplitude (8000 / 32768) survives


def test_healthz():
    async def go(srv, sinks, base):
        url = f"http://127.0.0.1:{srv.port}/healthz"
        return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read())

    body, _ = _serve(go)
    assert body == b"ok\n"


def test_send_command_and_its_errors(fixture_file, tmp_path, capsys):
    sinks = {"a": RecordingSink()}

    async def run_cli(argv):
        async with IngestServer(sinks, IngestConfig(port=0, token=TOKEN)) as srv:
            url = f"ws://127.0.0.1:{srv.port}/ingest/a"
            return await asyncio.to_thread(main, ["send", "--url", url, *argv])

    wav = tmp_path / "short.wav"
    clip = load_audio(fixture_file("yongen.wav"))
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(2), w.setsampwidth(2), w.setframerate(48000)
        w.writeframes(np.rint(clip.samples[:, :48000].T * 32767).astype("<i2").tobytes())
    assert asyncio.run(run_cli(["--wav", str(wav), "--token", TOKEN, "--no-realtime"])) == 0
    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1])["chunks"] == 50
    assert sinks["a"].audio.size == 16000
    code = asyncio.run(run_cli(["--wav", str(wav), "--token", "wrong"]))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "wrong or missing token" in err and len(err.splitlines()) == 1
    code = main(["send", "--url", "ws://127.0.0.1:9/ingest/a", "--wav", str(wav)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "cannot connect" in err and len(err.splitlines()) == 1
    with pytest.raises(UserError, match="sounddevice"):
        from musetalk_rt.live.send import send_microphone

        asyncio.run(send_microphone("ws://127.0.0.1:9/ingest/a"))


def test_tls_ingest_with_a_self_signed_certificate(tmp_path):
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    clip = _clip(1.0, seed=9)
    sinks = {"a": RecordingSink()}

    async def go():
        async with IngestServer(sinks, IngestConfig(port=0, token=TOKEN, ssl_context=ctx)) as srv:
            url = f"wss://127.0.0.1:{srv.port}/ingest/a"
            with pytest.raises(UserError, match="cannot connect") as err:  # untrusted certificate
                await send_clip(url, clip, TOKEN, realtime=False)
            assert "speak TLS" not in str(err.value)  # it does: the certificate is the matter
            plain = url.replace("wss://", "ws://")
            with pytest.raises(UserError, match="was started with --cert, use wss://"):
                await send_clip(plain, clip, TOKEN, realtime=False)
            return await send_clip(url, clip, TOKEN, realtime=False, cafile=str(cert))

    rep = asyncio.run(go())
    assert rep.chunks == 50
    np.testing.assert_allclose(sinks["a"].audio, clip.samples[0], atol=1e-4)


def test_send_over_tls_to_a_server_without_it_says_so():
    """wss:// to a plain server: the server resets the connection, which says nothing itself;
    the line names the likely cause and both ways out."""

    async def go():
        async with IngestServer({"a": RecordingSink()}, IngestConfig(port=0, token=TOKEN)) as srv:
            await send_clip(f"wss://127.0.0.1:{srv.port}/ingest/a", _clip(0.2), TOKEN)

    with pytest.raises(UserError) as err:
        asyncio.run(go())
    assert str(err.value).endswith(
        ": the server reset the connection; does the server speak TLS? A live process does "
        "with --cert; else use ws://"
    )
    with socket.socket() as s:  # a port nothing listens on: refused, no word of TLS
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UserError, match="cannot connect") as err:
        asyncio.run(send_clip(f"wss://127.0.0.1:{port}/ingest/a", _clip(0.2), TOKEN))
    assert "TLS" not in str(err.value) and "wss" not in str(err.value).split(": ", 1)[1]


def test_a_bye_frees_the_channel_at_once_while_its_last_messages_are_awaited():
    """After a bye the server waits for the session's last messages (a caption a Groq call
    away), but the channel is free meanwhile: a sender starting again is not refused as busy,
    and the old connection's wait ends there (the sink's messages are the new session's)."""

    class CaptionsOwed(RecordingSink):  # a sink whose last caption never comes
        def messages_pending(self):
            return True

        def take_messages(self):
            return []

    sink = CaptionsOwed()

    async def go():
        config = IngestConfig(port=0, token=TOKEN, bye_linger_s=600.0)
        async with IngestServer({"a": sink}, config) as srv:
            url = f"ws://127.0.0.1:{srv.port}/ingest/a"
            async with connect(url) as first:
                await first.send(_hello())
                assert json.loads(await first.recv())["type"] == "ready"
                await first.send(json.dumps({"type": "bye"}))
                while sink.open:  # the bye closes the sink's session
                    await asyncio.sleep(0.01)
                rep = await send_clip(url, _clip(0.2), TOKEN, realtime=False)  # not busy
                await asyncio.wait_for(_drain(first), 60)  # (a hang guard, not a timing)
                return rep, first.close_code

    rep, code = asyncio.run(go())
    assert rep.chunks == 10 and rep.error is None and code == 1000
    assert sink.sessions == 2
